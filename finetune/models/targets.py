"""Your own model class: `model._target_=my_pkg.MyNet` (finetune.base.instantiate), any nn.Module;
`model.head=<module name>` is its output layer, replaced by a fresh one for the data's classes (default:
its last Linear, else its last Conv2d). Layer groups are automatic unless `model.groups` gives regexes.
"""

from __future__ import annotations

import torch.nn as nn

from finetune.base.errors import UserError
from finetune.base.instantiate import instantiate_target
from finetune.models.heads import last_layer


def build_model(cfg) -> nn.Module:
    model = instantiate_target(str(cfg._target_), getattr(cfg, "args", None), "model")
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_={cfg._target_} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def head_path(model: nn.Module, head: str | None) -> str:
    """The output layer's module name: `model.head`, checked, or the last Linear (Conv2d) found."""
    if head is None:
        return last_layer(model)
    names = dict(model.named_modules())
    if head not in names:
        import difflib

        close = difflib.get_close_matches(head, [n for n in names if n], n=3)
        raise UserError(f"model.head={head}: the model has no module '{head}'"
                        + (f" (closest: {', '.join(close)})" if close else ""))
    if not isinstance(names[head], (nn.Linear, nn.Conv2d)):
        raise UserError(f"model.head={head} is a {type(names[head]).__name__}; it must be a Linear or Conv2d layer")
    return head
