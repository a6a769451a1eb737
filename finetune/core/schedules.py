"""LR schedules as pure functions of the step (nanoGPT's get_lr, per group).

`Schedule` holds one schedule with every length already in steps. `lr_factor(s, t, total)` is the
multiplier of the group's peak LR at local step t (0-based) of a span of `total` steps, and
`momentum_at(s, t, total)` the momentum (None: leave the optimizer's own). A linear warmup of
`s.warmup` steps comes first; the schedule itself then runs over the remaining steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetune.base.errors import UserError
from finetune.config.schema import ScheduleKind

KINDS = tuple(ScheduleKind)  # per-group schedules are plain text: checked against the same list


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    warmup: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 1
    gamma: float = 0.1  # step/multistep: per decay; exponential: per step
    milestones: tuple[int, ...] = ()
    pct_start: float = 0.25
    div_factor: float = 25.0
    final_div_factor: float = 1e5
    cycle_momentum: bool = True
    max_momentum: float = 0.95
    base_momentum: float = 0.85
    t0: int = 1
    t_mult: float = 2.0
    restart_decay: float = 1.0
    cut_frac: float = 0.1
    ratio: float = 32.0
    start_at_unfreeze: bool = True
    end_at_freeze: bool = False
    extra: dict = field(default_factory=dict, compare=False)


def from_config(cfg, steps_per_epoch: int, key: str = "schedule") -> Schedule:
    """Convert a ScheduleConfig-like mapping (lengths in epochs) into a Schedule (lengths in steps)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    kind = get("kind", "constant")
    if kind not in KINDS:
        raise UserError(f"{key}.kind: unknown schedule kind '{kind}'; choose one of {', '.join(KINDS)}")
    spe = steps_per_epoch

    def steps(epochs: float, name: str, minimum: int = 0) -> int:
        if epochs is None or epochs < 0:
            raise UserError(f"{key}.{name} must be >= 0, got {epochs}")
        return max(minimum, round(float(epochs) * spe))

    for name in ("pct_start", "cut_frac"):
        value = float(get(name, Schedule.__dataclass_fields__[name].default))
        if not 0.0 < value < 1.0:
            raise UserError(f"{key}.{name} must be between 0 and 1, got {value}")
    ramp = {"one_cycle": "pct_start", "slanted_triangular": "cut_frac"}.get(kind)
    if ramp and float(get("warmup", 0.0) or 0.0) > 0:
        raise UserError(f"{key}.warmup: {kind} ramps up by itself ({key}.{ramp}); set {key}.warmup=0")
    gamma = float(get("gamma", 0.1))
    if gamma <= 0:
        raise UserError(f"{key}.gamma must be > 0, got {gamma}")
    return Schedule(
        kind=kind,
        warmup=steps(get("warmup", 0.0), "warmup"),
        min_lr_ratio=float(get("min_lr_ratio", 0.0)),
        step_size=steps(get("step_size", 1.0), "step_size", minimum=1),
        gamma=gamma ** (1.0 / spe) if kind == "exponential" else gamma,
        milestones=tuple(sorted(steps(m, "milestones") for m in (get("milestones", []) or []))),
        pct_start=float(get("pct_start", 0.25)),
        div_factor=float(get("div_factor", 25.0)),
        final_div_factor=float(get("final_div_factor", 1e5)),
        cycle_momentum=bool(get("cycle_momentum", True)),
        max_momentum=float(get("max_momentum", 0.95)),
        base_momentum=float(get("base_momentum", 0.85)),
        t0=steps(get("t0", 1.0), "t0", minimum=1),
        t_mult=float(get("t_mult", 2.0)),
        restart_decay=float(get("restart_decay", 1.0)),
        cut_frac=float(get("cut_frac", 0.1)),
        ratio=float(get("ratio", 32.0)),
        start_at_unfreeze=bool(get("start_at_unfreeze", True)),
        end_at_freeze=bool(get("end_at_freeze", False)),
    )


def _cos(frac: float) -> float:
    """1 -> 0 along half a cosine as frac goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def _interp(a: float, b: float, frac: float) -> float:
    """Cosine interpolation from a (frac 0) to b (frac 1)."""
    return b + (a - b) * _cos(frac)


def _one_cycle_phase(s: Schedule, t: int, total: int) -> tuple[int, float]:
    """(phase, fraction within phase) of one-cycle: up until step pct_start*total - 1, then anneal to
    the last step (the same phase boundaries as torch's OneCycleLR)."""
    peak = max(1.0, float(s.pct_start * total) - 1.0)
    if t <= peak:
        return 0, t / peak
    return 1, (t - peak) / max(1.0, (total - 1) - peak)


def _sgdr_position(s: Schedule, t: int) -> tuple[int, float]:
    """(restart index, fraction within the current cycle) of SGDR with cycles t0, t0*t_mult, ..."""
    cycle, length, start = 0, float(s.t0), 0.0
    while t >= start + length:
        start += length
        length *= s.t_mult
        cycle += 1
    return cycle, (t - start) / length


def _main_factor(s: Schedule, t: int, total: int) -> float:
    floor = s.min_lr_ratio
    if s.kind == "constant":
        return 1.0
    if s.kind == "step":
        return s.gamma ** (t // s.step_size)
    if s.kind == "multistep":
        return s.gamma ** sum(1 for m in s.milestones if t >= m)
    if s.kind == "exponential":
        return s.gamma**t
    if s.kind == "linear":
        return 1.0 + (floor - 1.0) * t / total
    if s.kind == "cosine":
        return floor + (1.0 - floor) * _cos(t / total)
    if s.kind == "one_cycle":
        phase, frac = _one_cycle_phase(s, t, total)
        start, end = 1.0 / s.div_factor, 1.0 / (s.div_factor * s.final_div_factor)
        return _interp(start, 1.0, frac) if phase == 0 else _interp(1.0, end, frac)
    if s.kind == "sgdr":
        cycle, frac = _sgdr_position(s, t)
        peak = s.restart_decay**cycle
        return floor * peak + (peak - floor * peak) * _cos(frac)
    if s.kind == "slanted_triangular":
        cut = max(1, math.floor(total * s.cut_frac))
        p = t / cut if t < cut else 1.0 - (t - cut) / (cut * (1.0 / s.cut_frac - 1.0))
        return (1.0 + max(p, 0.0) * (s.ratio - 1.0)) / s.ratio  # clamp: cut/cut_frac may fall short of total
    raise UserError(f"unknown schedule kind '{s.kind}'")


def lr_factor(s: Schedule, t: int, total: int) -> float:
    """Multiplier of the peak LR at local step t of `total` steps (t < 0 is treated as 0)."""
    t = max(0, t)
    if t < s.warmup:
        return (t + 1) / (s.warmup + 1)
    return _main_factor(s, t - s.warmup, max(1, total - s.warmup))


def momentum_at(s: Schedule, t: int, total: int) -> float | None:
    """One-cycle cycles momentum inversely to the LR; every other kind leaves it alone."""
    if s.kind != "one_cycle" or not s.cycle_momentum:
        return None
    t = max(0, t)
    if t < s.warmup:
        return s.max_momentum
    phase, frac = _one_cycle_phase(s, t - s.warmup, max(1, total - s.warmup))
    hi, lo = s.max_momentum, s.base_momentum
    return _interp(hi, lo, frac) if phase == 0 else _interp(lo, hi, frac)
