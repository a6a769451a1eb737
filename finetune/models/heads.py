"""The fresh head every model gets: a Linear (or a 1x1 Conv2d) sized for the data's classes, with the
parameter names of the classifier it replaces, and where a model's output layer is."""

from __future__ import annotations

import torch.nn as nn

from finetune.base.errors import UserError


class _DropoutIn:
    """Mixin: dropout on the input of a layer; the dropout has no parameters, so the layer keeps the
    parameter names of the classifier it replaces (``fc.weight``, not ``fc.1.weight``)."""

    def forward(self, x):
        return super().forward(self.drop(x))


class HeadLinear(_DropoutIn, nn.Linear):
    def __init__(self, in_features: int, out_features: int, drop_rate: float = 0.0):
        super().__init__(in_features, out_features)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()


class HeadConv1x1(_DropoutIn, nn.Conv2d):
    """For classifiers that are 1x1 convolutions (squeezenet)."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0):
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()


def last_layer(model: nn.Module) -> str:
    """Path of a torchvision classifier's output layer: its last Linear (last Conv2d if it has none)."""
    for kind in (nn.Linear, nn.Conv2d):
        paths = [n for n, m in model.named_modules() if isinstance(m, kind)]
        if paths:
            return paths[-1]
    raise UserError(f"model: found no Linear or Conv2d layer to use as the head in {type(model).__name__}")


def replace_last_layer(model: nn.Module, num_classes: int, drop_rate: float, path: str | None = None) -> None:
    path = path or last_layer(model)
    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new: nn.Module = HeadLinear(old.in_features, num_classes, drop_rate)
    else:
        new = HeadConv1x1(old.in_channels, num_classes, drop_rate)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new.to(old.weight.device))
