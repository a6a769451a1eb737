"""Your own model class and dataset, Hydra's way: `model._target_=my_pkg.MyNet` and
`data._target_=my_pkg.make_dataset`, each built with `hydra.utils.instantiate` from the dotted path and
the `args` beside it. A module in the current directory is importable as well as one on PYTHONPATH
(the `finetune` script does not put the current directory on sys.path itself).

The model: any nn.Module; `model.head=<module name>` is its output layer, replaced by a fresh one for
the data's classes (default: its last Linear, else its last Conv2d). Layer groups are automatic unless
`model.groups` gives regexes. The dataset: called once per split with `split="train"` and
`split="val"` (plus `data.args`), it returns a torch Dataset of (image, label) samples (PIL images or
uint8/float CHW tensors); its classes are its `classes` attribute, else `data.num_classes` names.
"""

from __future__ import annotations

import functools
import os
import sys

import torch.nn as nn
from omegaconf import OmegaConf

from finetune.errors import UserError


def _instantiate(target: str, args, what: str, **extra):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs = _plain(args)
    try:
        return instantiate({"_target_": target, **kwargs, **extra})
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(f"{what}._target_={target}: {' '.join(str(cause).split())[:300]}") from None


def build_model(cfg) -> nn.Module:
    model = _instantiate(str(cfg._target_), getattr(cfg, "args", None), "model")
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={cfg._target_} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def head_path(model: nn.Module, head: str | None) -> str:
    """The output layer's module name: `model.head`, checked, or the last Linear (Conv2d) found."""
    from finetune.models import _last_layer

    if head is None:
        return _last_layer(model)
    names = dict(model.named_modules())
    if head not in names:
        import difflib

        close = difflib.get_close_matches(head, [n for n in names if n], n=3)
        raise UserError(f"model.head={head}: the model has no module '{head}'"
                        + (f" (closest: {', '.join(close)})" if close else ""))
    if not isinstance(names[head], (nn.Linear, nn.Conv2d)):
        raise UserError(f"model.head={head} is a {type(names[head]).__name__}; it must be a Linear or Conv2d layer")
    return head


def build_splits(cfg):
    """(train dataset, val dataset, class names) from data._target_ (built once per target and args)."""
    import json

    return _splits(str(cfg._target_), json.dumps(_plain(getattr(cfg, "args", None)), sort_keys=True), int(cfg.num_classes))


def _plain(args) -> dict:
    return OmegaConf.to_container(args, resolve=True) if OmegaConf.is_config(args) else dict(args or {})


@functools.lru_cache(maxsize=4)
def _splits(target: str, args_json: str, n_classes: int):
    import json

    args = json.loads(args_json)
    splits = [_instantiate(target, args, "data", split=s) for s in ("train", "val")]
    for split, ds in zip(("train", "val"), splits):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise UserError(f"data._target_={target} (split={split}) returned a {type(ds).__name__}, "
                            "not a Dataset of (image, label) samples")
        if len(ds) == 0:
            raise UserError(f"data._target_={target} returned an empty {split} dataset")
    classes = getattr(splits[0], "classes", None) or [str(i) for i in range(n_classes)]
    return splits[0], splits[1], [str(c) for c in classes]


def num_classes(cfg) -> int:
    return len(build_splits(cfg)[2])
