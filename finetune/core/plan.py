"""The training plan: every group's LR, momentum and trainability at every step, computed up front.

`build_plan(cfg, group_names, steps_per_epoch)` validates the cross-field settings (naming the key)
and returns a `Plan` whose methods are pure functions of the step or epoch. The runner only asks it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from finetune.base.errors import UserError
from finetune.config.schema import ScheduleConfig
from finetune.core import freeze, schedules
from finetune.core.optim import decay_depths, set_momentum, spread_lrs

PER_GROUP_KEYS = ("lr", "weight_decay", "schedule")


@dataclass(frozen=True)
class GroupPlan:
    name: str
    lr: float  # peak LR
    weight_decay: float
    schedule: schedules.Schedule
    schedule_cfg: dict  # as configured (for inspect)
    first_epoch: int | None  # first epoch it trains; None: never
    start_step: int  # step at which its schedule starts
    end_step: int | None = None  # step at which it ends (schedule.end_at_freeze); None: the run's end
    ramp_from: float | None = None  # lr_spread.ramp: its peak LR at step 0 (`lr`), growing to `lr` above


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupPlan, ...]
    epochs: int
    steps_per_epoch: int
    counts: tuple[int, ...]  # trainable groups per epoch
    max_steps: int | None = None  # the run ends after this many steps, inside its last epoch
    ramp_steps: int = 0  # lr_spread.ramp in steps

    @property
    def total_steps(self) -> int:
        full = self.epochs * self.steps_per_epoch
        return min(full, self.max_steps) if self.max_steps else full

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of `epoch`: steps_per_epoch, fewer in a last epoch that max_steps cuts short."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def trainable(self, epoch: int) -> list[bool]:
        return freeze.trainable_mask(self.counts[min(epoch, self.epochs - 1)], len(self.groups))

    def _local(self, g: int, step: int) -> tuple[int, int]:
        gp = self.groups[g]
        end = self.total_steps if gp.end_step is None else min(gp.end_step, self.total_steps)
        return min(step, end) - gp.start_step, end - gp.start_step

    def peak(self, g: int, step: int) -> float:
        """The group's peak LR at `step`: with lr_spread.ramp it moves log-linearly from `lr` (the spread
        uniform) to the spread's own value over the ramp's steps."""
        gp = self.groups[g]
        if gp.ramp_from is None or step >= self.ramp_steps:
            return gp.lr
        frac = step / self.ramp_steps
        return gp.ramp_from ** (1 - frac) * gp.lr ** frac

    def lr(self, g: int, step: int) -> float:
        t, total = self._local(g, step)
        return self.peak(g, step) * schedules.lr_factor(self.groups[g].schedule, t, total)

    def momentum(self, g: int, step: int) -> float | None:
        t, total = self._local(g, step)
        return schedules.momentum_at(self.groups[g].schedule, t, total)

    def lr_range(self, g: int) -> dict:
        """LR at the group's first trained step, its peak and the last step (for inspect)."""
        gp = self.groups[g]
        values = [self.lr(g, s) for s in range(gp.start_step, self.total_steps)] or [self.lr(g, 0)]
        return {"start": values[0], "peak": max(values), "end": values[-1]}


def apply(optimizer, plan: Plan, step: int) -> None:
    """Set every param group's LR (and cycled momentum) for `step` from the plan.

    Runs every step: values are computed once per layer group (each has up to two param groups),
    and the optimizer's list is read fresh because `load_state_dict` replaces its param-group dicts."""
    values = [(plan.lr(g, step), plan.momentum(g, step)) for g in range(len(plan.groups))]
    for pg in optimizer.param_groups:
        lr, momentum = values[pg["group"]]
        pg["lr"] = lr
        if momentum is not None:
            set_momentum(pg, momentum)


def _as_dict(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return dict(node)


def _check_lr(value, key: str) -> float:
    if isinstance(value, str):  # lr takes `auto` too, so its YAML and CLI values may arrive as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        also = " or auto (the LR finder's suggestion)" if key == "lr" else ""
        raise UserError(f"{key}: expected a number{also}, got {value!r}")
    value = float(value)
    if not value > 0 or not math.isfinite(value):  # nan compares False with everything
        raise UserError(f"{key} must be a finite number > 0, got {value}")
    return value


def total_steps(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """The optimizer steps of a run: every epoch's, or max_steps where that is fewer."""
    return min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)


def build_plan(cfg, group_names: Sequence[str], steps_per_epoch: int, depths: Sequence[int] | None = None,
               presets: Mapping[str, dict] | None = None) -> Plan:
    """Validate the config against the model's groups and compute the plan. `depths`: each group's depth
    for lr_spread.kind=layer_decay (optim.layer_depths of the model; default: from the group names).
    `presets`: what `schedule=<kind>` gives for each kind (finetune.config.presets), where a per-group
    schedule of another kind starts (default: the schema's defaults)."""
    n = len(group_names)
    if cfg.epochs < 1:
        raise UserError(f"epochs must be >= 1, got {cfg.epochs}")
    if steps_per_epoch < 1:
        raise UserError("the training set yields no batch: add data or lower batch_size")
    lr = _check_lr(cfg.lr, "lr")
    freeze.resolve_count(cfg.unfreeze, n)
    max_steps = cfg.max_steps
    if max_steps is not None and max_steps < 1:
        raise UserError(f"max_steps must be >= 1 (null: epochs x steps per epoch), got {max_steps}")
    # max_steps shortens the run: the epochs it reaches, the last one maybe partial; every schedule is
    # laid over these steps (it ends where the run ends), freeze changes stay at their epochs
    epochs = min(cfg.epochs, -(-max_steps // steps_per_epoch)) if max_steps else cfg.epochs
    counts = tuple(freeze.trainable_count(cfg.freeze, cfg.unfreeze, e, n, epochs) for e in range(epochs))
    first = freeze.first_trainable_epochs(cfg.freeze, cfg.unfreeze, n, epochs)
    last = freeze.last_trainable_epochs(counts, n)

    per_group = _as_dict(cfg.per_group)
    for name, settings in per_group.items():
        if name not in group_names:
            raise UserError(f"per_group.{name}: no layer group named '{name}'; groups are {list(group_names)}")
        unknown = set(settings or {}) - set(PER_GROUP_KEYS)
        if unknown:
            raise UserError(f"per_group.{name}: unknown key(s) {sorted(unknown)}; allowed {list(PER_GROUP_KEYS)}")

    lrs = spread_lrs(n, lr, cfg.lr_spread, depths if depths is not None else decay_depths(group_names))
    ramp = float(getattr(cfg.lr_spread, "ramp", 0.0) or 0.0)
    if ramp < 0:
        raise UserError(f"lr_spread.ramp must be >= 0 epochs, got {ramp}")
    if cfg.head_lr is not None:
        lrs[-1] = _check_lr(cfg.head_lr, "head_lr")
    base_schedule = _as_dict(cfg.schedule)
    total = total_steps(epochs, max_steps, steps_per_epoch)
    plans = []
    for i, name in enumerate(group_names):
        own = per_group.get(name) or {}
        group_lr = _check_lr(own["lr"], f"per_group.{name}.lr") if "lr" in own else lrs[i]
        wd = float(own.get("weight_decay", cfg.optimizer.weight_decay))
        if wd < 0:
            raise UserError(f"per_group.{name}.weight_decay must be >= 0, got {wd}")
        own_schedule = own.get("schedule") or {}
        start_from = base_schedule
        if own_schedule.get("kind", base_schedule["kind"]) != base_schedule["kind"]:
            # another kind starts from its own defaults (schedule=<kind>), not the global one's warmup etc.
            kind = own_schedule["kind"]
            start_from = {**((presets or {}).get(kind) or {**asdict(ScheduleConfig()), "kind": kind}),
                          "start_at_unfreeze": base_schedule["start_at_unfreeze"]}
        sched_cfg = {**start_from, **own_schedule}
        unknown = set(sched_cfg) - set(base_schedule)
        if unknown:
            raise UserError(f"per_group.{name}.schedule: unknown key(s) {sorted(unknown)}")
        key = f"per_group.{name}.schedule" if own.get("schedule") else "schedule"
        sched = schedules.from_config(sched_cfg, steps_per_epoch, key=key)
        start = first[i] * steps_per_epoch if (first[i] and sched.start_at_unfreeze) else 0
        # end_at_freeze: a group that stops training before the run's end anneals by then (freezeout)
        end = (last[i] + 1) * steps_per_epoch if sched.end_at_freeze and last[i] is not None else None
        end = end if end is not None and end < total else None
        span = (end if end is not None else total) - start
        if sched.warmup >= span and sched.warmup > 0 and first[i] is not None:  # a frozen group's LR is moot
            raise UserError(
                f"{key}.warmup ({sched_cfg['warmup']} epochs) is not shorter than the "
                f"{span / steps_per_epoch:g} epochs group '{name}' trains: set {key}.warmup below "
                f"{span / steps_per_epoch:g} or train longer (epochs)"
            )
        # the ramp moves the spread's LRs only: a group's own per_group LR and head_lr stay as set
        from_spread = "lr" not in own and not (i == n - 1 and cfg.head_lr is not None)
        ramp_from = lr if ramp and from_spread and group_lr != lr else None
        plans.append(GroupPlan(name, group_lr, wd, sched, sched_cfg, first[i], start, end, ramp_from))
    return Plan(tuple(plans), epochs, steps_per_epoch, counts, total if total < epochs * steps_per_epoch else None,
                round(ramp * steps_per_epoch))


def warnings(cfg, plan: Plan, random_init: bool) -> list[str]:
    """Legal settings that are likely mistakes, one sentence each (inspect prints them, train logs them)."""
    out = []
    names = [g.name for g in plan.groups]
    allowed = freeze.resolve_count(cfg.unfreeze, len(names))
    idle = [g.name for g in plan.groups[len(names) - allowed:] if g.first_epoch is None]
    if idle:
        out.append(f"group(s) {', '.join(idle)} never train in {plan.epochs} epochs although unfreeze={cfg.unfreeze} "
                   f"allows them (freeze.kind={cfg.freeze.kind}): their schedules never start; raise epochs or "
                   "lower unfreeze")
    if cfg.freeze.kind == "milestones":
        late = sorted(int(e) for e in _as_dict(cfg.freeze.milestones) if int(e) >= plan.epochs)
        if late:
            out.append(f"freeze.milestones at epoch {', '.join(map(str, late))}: past the last epoch "
                       f"({plan.epochs - 1}), so that change never happens")
    never = {g.name for g in plan.groups if g.first_epoch is None}
    for name in _as_dict(cfg.per_group):
        if name in never:
            out.append(f"per_group.{name} is set, but group '{name}' never trains")
    head_peak = plan.groups[-1].lr  # as configured: sampled peaks differ by where the steps fall
    body = [(g.lr, g.name) for g in plan.groups[:-1] if g.first_epoch is not None]
    if body and max(body)[0] > head_peak * (1 + 1e-9):
        lr, name = max(body)
        out.append(f"the head's peak LR ({head_peak:.3g}) is below the peak LR of group {name} ({lr:.3g}): a new "
                   "head usually needs the highest LR")
    if random_init and cfg.lr_spread.kind != "none":
        out.append(f"lr_spread.kind={cfg.lr_spread.kind} on a randomly initialised model (model.weights=null): "
                   "lower LRs for the early layers only slow them down when nothing is pretrained")
    return out
