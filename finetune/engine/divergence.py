"""A diverged run stops with one message (the step, its epoch, every group's LR) and never overwrites the
last good checkpoint: losses are checked in batches (one transfer), weights and buffers before a save."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.core.plan import Plan


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the message names the step and every group's LR."""


def first_bad(pending: list[tuple[int, torch.Tensor]]) -> tuple[int, torch.Tensor] | None:
    """The first (step, loss) whose loss is NaN or infinite, read back in one transfer (GradScaler's
    skipped fp16 overflow steps have finite losses, so they never land here)."""
    if not pending:
        return None
    losses = torch.stack([loss.float() for _, loss in pending])
    bad = (~torch.isfinite(losses)).nonzero()
    return pending[int(bad[0])] if len(bad) else None


def diverged(what: str, plan: Plan, step: int, kept: Path | None) -> NonFiniteLoss:
    """The one message of every divergence: what, the step's epoch and every group's LR there."""
    epoch = step // plan.steps_per_epoch
    mask = plan.trainable(epoch)
    lrs = ", ".join(f"{g.name}={plan.lr(i, step):.3g}" + ("" if mask[i] else " (frozen)")
                    for i, g in enumerate(plan.groups))
    return NonFiniteLoss(f"{what} (epoch {epoch}) with LRs {lrs}; stopped, {_kept(kept)}. "
                         "Lower the LR or set grad_clip")


def _kept(ckpt: Path | None) -> str:
    return f"the last good checkpoint {ckpt} is kept" if ckpt and ckpt.is_file() else "no checkpoint was written"


def check_finite_state(model: nn.Module, plan: Plan, step: int, ckpt: Path) -> None:
    """A good checkpoint holds finite weights and buffers (BatchNorm statistics included); `step` steps
    are done."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise diverged(f"{name} became non-finite by step {step - 1}", plan, max(0, step - 1), ckpt)
