"""Freezing: which groups train in which epoch (pure), and applying that to a model.

Epochs count from 0. `trainable_count(...)` says how many of the LAST groups train in an epoch.
`unfreeze` is the most groups that ever train: `fixed` trains that many throughout, `gradual` starts
with the head and adds one group every `every` epochs up to it (ULMFiT), `fine_tune` trains the head
alone for `head_epochs` and then that many (fastai); `milestones` starts with `unfreeze` groups and
switches to the configured count at each milestone epoch (a lower count freezes groups again, bottom
up: gradual freezing); `freezeout` (FreezeOut, Brock et al. 2017) trains them all and freezes them bottom
up, group i of n after a share t0 + (1 - t0) i / (n - 1) of the epochs, the head never.
`apply_trainable` flips requires_grad so autograd computes nothing below the lowest trainable group,
and `frozen_norm_modules` lists the BatchNorm layers of frozen groups, which stay in eval mode so
their running statistics do not move (with `bn_eval`, every BatchNorm layer: small batches of a few
hundred images would otherwise replace the pretrained statistics with noisy ones).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch.nn as nn

from finetune.base.errors import UserError
from finetune.config.schema import FreezeKind
from finetune.core.groups import LayerGroup

FREEZE_KINDS = tuple(FreezeKind)


def resolve_count(value, n_groups: int, key: str = "unfreeze") -> int:
    """`all` or an int in 1..n_groups -> number of trainable (last) groups."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return n_groups
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"{key}: expected an integer or 'all', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}: expected an integer or 'all', got {value!r}")
    if not 1 <= value <= n_groups:
        raise UserError(
            f"{key}={value} is out of range: the model has {n_groups} layer groups "
            f"(use 1..{n_groups} or 'all')"
        )
    return value


def _milestones(freeze_cfg, n_groups: int) -> list[tuple[int, int]]:
    out = []
    for epoch, count in dict(freeze_cfg.milestones or {}).items():
        try:
            e = int(epoch)
        except ValueError:
            raise UserError(f"freeze.milestones: epoch '{epoch}' is not an integer") from None
        if e < 0:
            raise UserError(f"freeze.milestones: epoch {e} is negative")
        out.append((e, resolve_count(count, n_groups, key=f"freeze.milestones.{e}")))
    return sorted(out)


def freezeout_ends(t0: float, n_groups: int, epochs: int) -> list[int]:
    """freezeout: the epoch at which each group stops training (the head: `epochs`, never)."""
    if not 0.0 < t0 <= 1.0:
        raise UserError(f"freeze.t0 must be in (0, 1], got {t0}")
    if n_groups == 1:
        return [epochs]
    return [max(1, round(epochs * (t0 + (1 - t0) * i / (n_groups - 1)))) for i in range(n_groups - 1)] + [epochs]


def trainable_count(freeze_cfg, unfreeze, epoch: int, n_groups: int, epochs: int | None = None) -> int:
    """How many of the last groups train during `epoch` (pure function of the config and the epoch);
    freezeout needs the run's `epochs`."""
    kind = freeze_cfg.kind
    base = resolve_count(unfreeze, n_groups)
    if kind == "freezeout":
        ends = freezeout_ends(float(freeze_cfg.t0), n_groups, epochs if epochs is not None else epoch + 1)
        return min(base, sum(1 for end in ends if end > epoch))
    if kind == "fixed":
        return base
    if kind == "milestones":
        count = base
        for e, c in _milestones(freeze_cfg, n_groups):
            if epoch >= e:
                count = c
        return count
    if kind == "gradual":
        if freeze_cfg.every < 1:
            raise UserError(f"freeze.every must be >= 1, got {freeze_cfg.every}")
        return min(base, 1 + epoch // freeze_cfg.every)
    if kind == "fine_tune":
        if freeze_cfg.head_epochs < 0:
            raise UserError(f"freeze.head_epochs must be >= 0, got {freeze_cfg.head_epochs}")
        return 1 if epoch < freeze_cfg.head_epochs else base
    raise UserError(f"freeze.kind: unknown kind '{kind}'; choose one of {', '.join(FREEZE_KINDS)}")


def last_trainable_epochs(counts: Sequence[int], n_groups: int) -> list[int | None]:
    """For each group, the last epoch in which it trains, from the per-epoch counts (None: never)."""
    last: list[int | None] = [None] * n_groups
    for epoch, count in enumerate(counts):
        for i, on in enumerate(trainable_mask(count, n_groups)):
            if on:
                last[i] = epoch
    return last


def trainable_mask(count: int, n_groups: int) -> list[bool]:
    return [i >= n_groups - count for i in range(n_groups)]


def first_trainable_epochs(freeze_cfg, unfreeze, n_groups: int, epochs: int) -> list[int | None]:
    """For each group, the first epoch in which it trains (None: never within `epochs`)."""
    first: list[int | None] = [None] * n_groups
    for epoch in range(epochs):
        count = trainable_count(freeze_cfg, unfreeze, epoch, n_groups, epochs)
        for i, on in enumerate(trainable_mask(count, n_groups)):
            if on and first[i] is None:
                first[i] = epoch
    return first


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


def apply_trainable(
    model: nn.Module, groups: Sequence[LayerGroup], mask: Sequence[bool], train_bn: bool = False
) -> None:
    """requires_grad = group trainable (or, with train_bn, the parameter belongs to a BatchNorm), except for a
    group's fixed parameters (the base weights under adapters), which never train."""
    bn_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    params = dict(model.named_parameters())
    for group, on in zip(groups, mask):
        fixed = set(group.fixed)
        for name in group.param_names:
            p = params[name]
            p.requires_grad_((bool(on) or (train_bn and id(p) in bn_params)) and name not in fixed)


def frozen_norm_modules(
    model: nn.Module, groups: Sequence[LayerGroup], mask: Sequence[bool], train_bn: bool = False,
    bn_eval: bool = False,
) -> list[nn.Module]:
    """BatchNorm modules that must stay in eval mode: those whose parameters all sit in frozen groups, or,
    with bn_eval, every one (trainable groups then normalise with the pretrained statistics). A BatchNorm
    whose parameters are fixed under adapters is part of the base model, whose statistics stay too."""
    if bn_eval:
        return [m for m in model.modules() if _is_norm(m)]
    fixed = {name for g in groups for name in g.fixed}
    frozen = fixed if train_bn else fixed | {name for g, on in zip(groups, mask) if not on for name in g.param_names}
    out = []
    for mod_name, module in model.named_modules():
        if not _is_norm(module):
            continue
        names = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
        if names and all(n in frozen for n in names):
            out.append(module)
        elif not names and not train_bn and _buffer_group_frozen(f"{mod_name}.running_mean", groups, mask):
            out.append(module)  # affine=False: no parameter says its group; its buffers' names do
    return out


def _buffer_group_frozen(name: str, groups: Sequence[LayerGroup], mask: Sequence[bool]) -> bool:
    """Whether the first group whose patterns match `name` (as they match parameter names) is frozen."""
    for group, on in zip(groups, mask):
        if any(re.match(p, name) for p in group.patterns):
            return not on
    return False


def batchnorm_mode(train_bn: bool, bn_eval: bool) -> str:
    """In words, what `frozen_norm_modules` decides for these settings (bn_eval wins over train_bn)."""
    if bn_eval:
        return "pretrained statistics in every layer (freeze.bn_eval)"
    if train_bn:
        return "batch statistics in every layer, affine trained in frozen groups too (freeze.train_bn)"
    return "pretrained statistics in frozen groups, batch statistics in trainable ones"


def set_train_mode(model: nn.Module, frozen_norms: Sequence[nn.Module]) -> None:
    """model.train(), except that BatchNorm layers of frozen groups keep their running statistics."""
    model.train()
    for module in frozen_norms:
        module.eval()
