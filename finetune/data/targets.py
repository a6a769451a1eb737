"""Your own dataset: `data._target_=my_pkg.make_dataset` (finetune.base.instantiate), called once per
split with `split="train"` and `split="val"` (plus `data.args`); it returns a torch Dataset of (image,
label) samples (PIL images or uint8/float CHW tensors); its classes are its `classes` attribute, else
`data.num_classes` names.
"""

from __future__ import annotations

import functools
import json

from finetune.base.errors import UserError
from finetune.base.instantiate import instantiate_target, plain


def build_splits(cfg):
    """(train dataset, val dataset, class names) from data._target_ (built once per target and args)."""
    return _splits(str(cfg._target_), json.dumps(plain(getattr(cfg, "args", None)), sort_keys=True), int(cfg.num_classes))


@functools.lru_cache(maxsize=4)
def _splits(target: str, args_json: str, n_classes: int):
    args = json.loads(args_json)
    splits = [instantiate_target(target, args, "data", split=s) for s in ("train", "val")]
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
