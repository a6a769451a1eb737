"""Your own classes, Hydra's way: `model._target_=my_pkg.MyNet`, `data._target_=my_pkg.make_dataset`,
built with `hydra.utils.instantiate` from the dotted path and the `args` beside it. A module in the
current directory is importable as well as one on PYTHONPATH (the `finetune` script does not put the
current directory on sys.path itself)."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

from finetune.base.errors import UserError


def instantiate_target(target: str, args, what: str, **extra):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs = plain(args)
    try:
        return instantiate({"_target_": target, **kwargs, **extra})
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(f"{what}._target_={target}: {' '.join(str(cause).split())[:300]}") from None


def plain(args) -> dict:
    return OmegaConf.to_container(args, resolve=True) if OmegaConf.is_config(args) else dict(args or {})
