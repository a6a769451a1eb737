"""Exponential moving average (EMA) of the weights: a smoothed copy of the model that evaluation uses.

The average is debiased (as Adam debiases its moments): after step t it weighs the weights after steps
1..t by decay**(t - i), normalised, so the pretrained start and the random head never linger in it and
the first update simply copies the model. The half-life is given in epochs, so the same setting means
the same averaging window at five steps an epoch and at five thousand.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from finetune.base.errors import UserError


def decay_for(half_life_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay whose weight halves every `half_life_epochs` epochs."""
    if not half_life_epochs > 0:
        raise UserError(f"ema_half_life must be a positive number of epochs, got {half_life_epochs} "
                        "(null: no weight average)")
    return 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch))


def update_weight(decay: float, t: int) -> float:
    """Weight of the current weights in the debiased average after the t-th update (t >= 1)."""
    return (1.0 - decay) / (1.0 - decay**t)


class WeightEMA:
    """A frozen deep copy of the model whose floating tensors (parameters and buffers such as BatchNorm
    running statistics) track the live model's; integer buffers are copied. Build it after the model
    has its final device and memory format: it keeps references to the live tensors."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self._tensors(self.model), self._tensors(model)))
        self._avg = [a for a, m in pairs if a.is_floating_point()]
        self._live = [m for a, m in pairs if a.is_floating_point()]
        self._int = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return list(model.parameters()) + list(model.buffers())

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # lerp(a, a, w) == a exactly, so frozen weights stay bit-equal in the average too
        torch._foreach_lerp_(self._avg, self._live, update_weight(self.decay, self.updates))
        for a, m in self._int:
            a.copy_(m)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
