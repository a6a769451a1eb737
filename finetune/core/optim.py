"""Per-group learning rates, param groups and the ONE optimizer that holds every group from the start.

Each layer group becomes up to two optimizer param groups (with and without weight decay) that carry
`group` (the layer-group index) and `name`, so the plan can set their LR per step. Frozen groups are
in the optimizer too: their parameters keep grad None, so neither the update nor weight decay touches
them, and unfreezing later never adds param groups (which would break schedulers and resume).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.config.schema import OptimizerName, SpreadKind
from finetune.core.groups import LayerGroup

SPREAD_KINDS = tuple(SpreadKind)
OPTIMIZERS = tuple(OptimizerName)


def decay_depths(group_names: Sequence[str], layer_of: Sequence[int] | None = None,
                 top: int | None = None) -> list[int]:
    """Each group's depth for layer_decay, counted as timm's param_groups_layer_decay counts it.

    With `layer_of` (timm's layer id of each group's top parameter, from the model's own group_matcher)
    and `top` (its largest id): top - id, so the decay matches timm's for every parameter wherever the
    groups are as fine as timm's layers. Without (torchvision and other models): the head at 0, one more
    per group below it, except that a `neck` group (the final norm) shares the depth of the group below
    it, as timm counts a ViT's final norm with its last block."""
    if layer_of is not None:
        return [top - layer for layer in layer_of]
    depths, depth = [], 0
    for i in range(len(group_names) - 1, -1, -1):
        depths.append(depth)
        if group_names[i] != "neck":
            depth += 1
    return depths[::-1]


def timm_layer_ids(model: nn.Module, groups: Sequence[LayerGroup]) -> tuple[list[int], int] | None:
    """(the timm layer id of each group's top parameter, the largest id) from the model's
    group_matcher(coarse=False), exactly as timm's layer decay assigns them; None for other models."""
    if not callable(getattr(model, "group_matcher", None)):
        return None
    from timm.models import group_parameters

    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_map.values(), default=0)  # timm's layer_max; unmatched parameters (the head) sit there
    return [max(layer_map.get(name, top) for name in g.param_names) for g in groups], top


def layer_depths(model: nn.Module, groups: Sequence[LayerGroup]) -> list[int]:
    ids = timm_layer_ids(model, groups)
    return decay_depths([g.name for g in groups], *(ids or (None, None)))


def spread_lrs(n: int, lr: float, spread, depths: Sequence[int]) -> list[float]:
    """Peak LR of each of n groups (input -> output); the last (head) group gets `lr`. `depths`: each
    group's depth for layer_decay (decay_depths)."""
    kind = spread.kind
    if kind == "none":
        return [lr] * n
    if kind == "body":  # one LR for every group below the head: lr * ratio (LP-FT's pretrained body)
        if spread.ratio <= 0:
            raise UserError(f"lr_spread.ratio must be > 0, got {spread.ratio}")
        return [lr * spread.ratio] * (n - 1) + [lr]
    if kind == "geometric":  # fastai slice(lo, hi): evenly spaced on a log scale
        lo = spread.lo if spread.lo is not None else lr / 100
        if lo <= 0:
            raise UserError(f"lr_spread.lo must be > 0, got {lo}")
        if n == 1:
            return [lr]
        return [lo * (lr / lo) ** (i / (n - 1)) for i in range(n)]
    if kind == "ulmfit":  # each lower group = the one above / factor
        if spread.factor <= 0:
            raise UserError(f"lr_spread.factor must be > 0, got {spread.factor}")
        return [lr / spread.factor ** (n - 1 - i) for i in range(n)]
    if kind == "layer_decay":  # timm / BEiT layer-wise decay, depth 0 = head
        if not 0 < spread.decay <= 1:
            raise UserError(f"lr_spread.decay must be in (0, 1], got {spread.decay}")
        return [lr * spread.decay ** d for d in depths]
    raise UserError(f"lr_spread.kind: unknown kind '{kind}'; choose one of {', '.join(SPREAD_KINDS)}")


# torchvision's ViT (class token, position embedding), Swin and MaxViT (relative position bias tables), Swin
# V2 (logit scale, continuous position bias MLP): they declare no no_weight_decay() as timm's models do,
# and decay would pull these embeddings towards zero like it would a bias
NO_DECAY_NAMES = re.compile(r"(.*\.)?(class_token|pos_embedding|relative_position_bias_table|logit_scale)$"
                            r"|(.*\.)?cpb_mlp\.")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases, normalisation weights (every 1-d parameter), position embeddings and class tokens
    (NO_DECAY_NAMES), and the model's own no_weight_decay list."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1 or NO_DECAY_NAMES.match(n)}
    own = getattr(model, "no_weight_decay", None)
    if callable(own):
        skip = set(own())
        names |= {n for n, _ in model.named_parameters() if n in skip}
    return names


def param_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    no_decay_norm_bias: bool = True,
) -> list[dict]:
    """Optimizer param-group dicts for every layer group, frozen ones included."""
    params = dict(model.named_parameters())
    no_decay = _no_decay_names(model) if no_decay_norm_bias else set()
    out = []
    for index, (group, lr, wd) in enumerate(zip(groups, lrs, weight_decays)):
        decay = [params[n] for n in group.param_names if n not in no_decay]
        plain = [params[n] for n in group.param_names if n in no_decay]
        for plist, weight_decay in ((decay, wd), (plain, 0.0)):
            if plist:
                out.append(
                    {"params": plist, "lr": lr, "initial_lr": lr, "weight_decay": weight_decay,
                     "group": index, "name": group.name}
                )
    return out


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The ONE optimizer. SGD/Adam/AdamW use their fused kernels: one kernel for all param groups
    instead of a Python loop over them, so 6 layer groups cost what 1 does (scripts/bench_speed.py)."""
    name = cfg.name.lower()
    lr = groups[0]["lr"]
    if name == "sgd":
        return _fused(torch.optim.SGD, groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return _fused(cls, groups, lr=lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, eps=cfg.eps)
    raise UserError(f"optimizer.name: unknown optimizer '{cfg.name}'; choose one of {', '.join(OPTIMIZERS)}")


def _fused(cls, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """Fused where every parameter is a float tensor on a device with fused kernels, else the default."""
    params = [p for g in groups for p in g["params"]]
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch without fused kernels for this device
            pass
    return cls(groups, **kwargs)


def set_momentum(param_group: dict, momentum: float) -> None:
    """Momentum for SGD/RMSprop, beta1 for Adam(W): what one-cycle cycles."""
    if "betas" in param_group:
        param_group["betas"] = (momentum, param_group["betas"][1])
    elif "momentum" in param_group:
        param_group["momentum"] = momentum
