"""The LR range test (Leslie Smith; fastai's lr_find), aware of layer groups: `finetune lr-find` and
`lr=auto`.

The swept LR rises exponentially from lr_find.start to lr_find.end over lr_find.steps optimizer steps,
with the freeze state of the recipe's first epoch (lr_find.epoch). By default every group keeps its
configured ratio to the head (a spread of 1e-2 / 2e-4 stays 50:1 at every point of the sweep), so the
suggestion is the head's `lr` and the recipe places the others as it always does; with
`lr_find.group=<name>` that group alone sweeps and the others keep their configured LRs. (A finder that
sets every group to one LR erases the discriminative ratios it is meant to choose for.)

Afterwards the model's weights and BatchNorm statistics, the optimizer's state, the weight average, the
trainable flags and every RNG are exactly what they were. The suggestion is fastai's "valley" (two
thirds down the longest stretch over which the smoothed loss keeps falling); the steepest descent is
reported beside it.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from finetune.base.errors import UserError
from finetune.core import freeze
from finetune.engine import checkpoint
from finetune.engine.loop import Run
from finetune.engine.step import chunks
from finetune.output import report
from finetune.output.progress import bar

log = logging.getLogger("finetune")


def sweep_lrs(start: float, end: float, steps: int) -> list[float]:
    """`steps` LRs from `start` to `end`, evenly spaced on a log scale."""
    if not (0 < start < end) or steps < 2:
        raise UserError(f"lr_find: needs 0 < start < end and steps >= 2, got start={start}, end={end}, steps={steps}")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def group_lrs(peaks: list[float], swept: float, group: int | None) -> list[float]:
    """Every group's LR at one point of the sweep: all scaled with the head (the last group) when `group`
    is None, else `group` at `swept` and the others at their peaks."""
    if group is None:
        return [swept * p / peaks[-1] for p in peaks]
    return [swept if i == group else p for i, p in enumerate(peaks)]


class Smoother:
    """An exponential moving average of the losses, debiased (the first values are not pulled to 0),
    one value at a time."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def add(self, loss: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.n)


def steepest(lrs: list[float], losses: list[float]) -> int:
    """Index of the steepest fall of the loss against log(LR)."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__) + 1


def valley(losses: list[float]) -> int:
    """fastai's "valley": the longest decreasing subsequence of the loss is found, read as the stretch of
    that many points ending where it ends, and the point half-way along it is taken (an LR well into the
    fall and short of its bottom)."""
    n = len(losses)
    length = [1] * n
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
        if length[i] > length[best_end]:
            best_end = i
    start = best_end - length[best_end]
    third = (best_end - start) / 3
    return max(0, min(n - 1, start + int(third) + int(third / 2)))


def _snapshot(trainer) -> dict:
    model = trainer.model
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scaler": copy.deepcopy(trainer.scaler.state_dict()),
            "ema": copy.deepcopy(trainer.ema.state_dict()) if trainer.ema else None,
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}, "rng": checkpoint.rng_state(),
            "mask": trainer.mask, "frozen_norms": trainer.frozen_norms, "forward": trainer.forward,
            "ddp": trainer.ddp, "training": model.training}


def _restore(trainer, snap: dict) -> None:
    model = trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(snap["model"])
    trainer.optimizer.load_state_dict(snap["optimizer"])
    trainer.scaler.load_state_dict(snap["scaler"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(snap["ema"])
    for name, p in model.named_parameters():
        p.requires_grad_(snap["grad"][name])
    trainer.mask, trainer.frozen_norms = snap["mask"], snap["frozen_norms"]
    trainer.forward, trainer.ddp = snap["forward"], snap["ddp"]
    model.train(snap["training"])
    checkpoint.set_rng_state(snap["rng"])


def find(run, settings) -> dict:
    """The range test on a built Run (finetune/engine/loop.py), which is left exactly as it was; returns the
    sweep (lrs, losses, smoothed), the suggestions and the override to pass."""
    trainer, plan = run.trainer, run.plan
    names = [g.name for g in plan.groups]
    group = None
    if settings.group is not None:
        if settings.group not in names:
            raise UserError(f"lr_find.group: no layer group '{settings.group}'; groups are {names}")
        group = names.index(settings.group)
    if not 0 <= settings.epoch < plan.epochs:
        raise UserError(f"lr_find.epoch must be in [0, {plan.epochs - 1}], got {settings.epoch}")
    if group is not None and not plan.trainable(settings.epoch)[group]:
        raise UserError(f"lr_find.group={settings.group} is frozen in epoch {settings.epoch}; choose an epoch "
                        "in which it trains (lr_find.epoch)")
    peaks = [gp.lr for gp in plan.groups]
    lrs = sweep_lrs(settings.start, settings.end, settings.steps)
    images, seen = len(run.data.train), settings.steps * run.data.batch_size * run.accumulate
    if seen > 5 * images:  # the curve then shows how fast a few images are memorised, not a good LR
        log.warning("lr_find: %d steps of %d images each go over the %d train images %.0f times; the suggestion "
                    "reflects memorising them (lower lr_find.steps, or add data)", settings.steps,
                    run.data.batch_size * run.accumulate, images, seen / images)
    snap = _snapshot(trainer)
    tried, losses, smoothed, set_lrs = [], [], [], []
    smoother = Smoother(settings.smooth)
    try:
        trainer.mask = None  # apply the epoch's freeze state afresh (and restore the run's afterwards)
        trainer.set_epoch(settings.epoch)
        freeze.set_train_mode(trainer.model, trainer.frozen_norms)
        batches = _batches(run, chunks)
        best = math.inf
        with bar(len(lrs), "lr-find", enabled=run.cfg.progress) as advance:
            for i, lr in enumerate(lrs):
                micro = [trainer.to_device(x, y) for x, y in next(batches)]
                loss = float(trainer.step_accumulated(micro, i, lrs=group_lrs(peaks, lr, group))[0])
                advance()
                if not math.isfinite(loss):
                    break
                # every group's LR as the optimizer had it (read back, as the LR trace is)
                on = {pg["group"]: pg["lr"] for pg in trainer.optimizer.param_groups}
                set_lrs.append([on[g] for g in range(len(names))])
                tried.append(lr)
                losses.append(loss)
                smoothed.append(smoother.add(loss))
                best = min(best, smoothed[-1])
                if smoothed[-1] > settings.diverge * best:
                    break
    finally:
        _restore(trainer, snap)
    if len(tried) < 5:
        raise UserError(f"lr_find: the loss diverged after {len(tried)} steps; lower lr_find.start")
    # as fastai reads its curve: past the first tenth (the smoothing's start) and before the last 5
    # points (the blow-up)
    lo, hi = len(tried) // 10, max(len(tried) // 10 + 3, len(tried) - 5)
    if smoothed[lo] - min(smoothed[lo:hi]) < 0.01 * abs(smoothed[lo]):  # a valley of a flat curve is noise
        raise UserError(f"lr_find: the loss did not fall anywhere between lr {tried[lo]:.2g} and {tried[hi - 1]:.2g} "
                        f"(by under 1% of {smoothed[lo]:.3g}): no LR to suggest; widen lr_find.start / lr_find.end, "
                        "or check the data (labels, enough images)")
    v, s = lo + valley(smoothed[lo:hi]), lo + steepest(tried[lo:hi], smoothed[lo:hi])
    head = len(names) - 1
    if group is None:
        override = f"lr={tried[v]:.3g}"
    elif group == head:
        override = f"head_lr={tried[v]:.3g}"
    else:
        override = f"++per_group.{names[group]}.lr={tried[v]:.3g}"
    return {"lrs": tried, "losses": losses, "smoothed": smoothed, "valley": tried[v], "steepest": tried[s],
            "suggestion": tried[v], "override": override, "swept": names[group] if group is not None else "all",
            "group_lrs": set_lrs, "groups": names}


def _batches(run, chunks):
    """Optimizer steps' worth of micro-batches, epoch after epoch, in the run's data order."""
    epoch = 0
    while True:
        for chunk in chunks(run.data.train_loader(epoch), run.accumulate, run.plan.steps_per_epoch):
            yield chunk
        epoch += 1


def write(result: dict, out_dir: Path) -> None:
    """lr_find.csv (a row per step: the swept LR, every group's LR, the loss raw and smoothed) and
    lr_find.png (the smoothed loss against the LR, the suggestions marked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = result["groups"]
    rows = [{"step": i, "lr": lr, **{f"lr_{n}": v for n, v in zip(names, glrs)}, "loss": loss, "smoothed_loss": sm}
            for i, (lr, glrs, loss, sm) in enumerate(zip(result["lrs"], result["group_lrs"], result["losses"],
                                                         result["smoothed"]))]
    report.write_csv(out_dir / "lr_find.csv", rows, ["step", "lr", *[f"lr_{n}" for n in names], "loss", "smoothed_loss"])
    report.plot_lr_find(out_dir / "lr_find.png", result)


def provisional(cfg):
    """`cfg` with a number for lr when it says auto (the ratios between groups do not depend on it)."""
    if str(cfg.lr) != "auto":
        return cfg
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "lr", 1e-3)
    return cfg


def run_finder(cfg, out_dir: Path, multi_process: str, write_files: bool = True) -> dict:
    """The range test on a run of its own, built from `cfg` (lr=auto replaced); lr_find.png and .csv
    written to `out_dir`. `multi_process`: the error under torchrun (the finder uses one process)."""
    finder = Run(provisional(cfg), out_dir)
    if finder.world.enabled:
        raise UserError(multi_process)
    try:
        result = find(finder, cfg.lr_find)
    finally:
        finder.data.close()
    if write_files:
        write(result, out_dir)
    return result


def choose(cfg, out_dir: Path | None) -> dict:
    """lr=auto: run the finder on a run of its own (built from the same config and seed, so the run
    that then trains starts exactly as `lr=<suggestion>` would) and return what it found; lr_find.png
    and .csv in `out_dir` (None: no files, as for inspect)."""
    multi = "lr=auto runs the LR finder, which uses one process: run `finetune lr-find` first and pass its lr= to torchrun"
    if out_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            result = run_finder(cfg, Path(scratch), multi, write_files=False)
    else:
        result = run_finder(cfg, out_dir, multi)
    log.info("lr=auto: the LR finder suggests lr=%.3g (valley; steepest descent at %.3g)%s",
             result["suggestion"], result["steepest"], f"; lr_find.png in {out_dir}" if out_dir else "")
    return {"lr": float(f"{result['suggestion']:.3g}"), "valley": result["valley"], "steepest": result["steepest"],
            "steps": len(result["lrs"]), "plot": str(out_dir / "lr_find.png") if out_dir else None}


def resolve_lr(cfg, out_dir: Path | None, saved: dict | None):
    """(cfg with a number for lr, what lr=auto chose or None): the one place lr=auto becomes a number,
    before any plan is built. The finder runs under `cfg`'s recipe (its LR ratios); a resumed run keeps
    the LR its checkpoint (`saved`) was trained with."""
    if str(cfg.lr) != "auto":
        return cfg, None
    if saved is not None:
        chosen = {"lr": saved["config"]["lr"], "resumed": True}
    else:
        chosen = choose(cfg, out_dir)
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "lr", chosen["lr"])
    return cfg, chosen
