"""The plain baselines' bookkeeping (scripts/plain_head_only.py, plain_full.py): their training loops stay
in the scripts, plain PyTorch; here each seed's run is timed and kept beside the settings it ran with, so a
script run again continues, and plain_full's best LR is chosen."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from finetune.bench.results import RecipeStats, RunResult


def cached_run(path: Path, settings: dict, train: Callable[[], RunResult]) -> RunResult:
    """`train()`'s RunResult, kept in `path` with the settings it ran with: a script run again (after an
    interruption, say) reuses every finished run whose settings are unchanged."""
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept["settings"] == settings:
            return RunResult(**kept["result"])
    result = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "result": result.__dict__}, indent=2) + "\n")
    return result


def timed(recipe: str, seed: int, train: Callable[[], list[float]]) -> RunResult:
    """`train()`'s val accuracy per epoch as a RunResult, with the seconds it took."""
    start = time.perf_counter()
    accs = train()
    return RunResult(recipe, seed, accs, round(time.perf_counter() - start, 1))


def seed_runs(recipe: str, seeds: range, runs: Path, train: Callable[..., list[float]], settings: dict,
              prefix: str = "") -> RecipeStats:
    """`train(seed=seed, **settings)` for each seed, as `recipe`'s runs, each kept in runs/seed<i>.json (a
    run again reuses it while `settings` stay the same: they are train's arguments, so nothing that
    changes a run is left out). Prints each seed's val accuracy per epoch after `prefix`."""
    kept = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}  # as JSON keeps them
    stats = RecipeStats(recipe)
    for seed in seeds:
        result = cached_run(runs / f"seed{seed}.json", kept,
                            lambda: timed(recipe, seed, lambda: train(seed=seed, **settings)))
        stats.runs.append(result)
        print(f"{prefix}seed {seed}: val acc per epoch " + " ".join(f"{a:.3f}" for a in result.val_acc), flush=True)
    return stats


def lr_runs(recipe: str, seeds: range, runs: Path, train: Callable[..., list[float]],
            settings: dict) -> dict[float, RecipeStats]:
    """{lr: seed_runs at that LR} for each LR of the list settings["lr"] (kept under runs/lr<lr>/), each
    run marked with its LR."""
    by_lr = {}
    for lr in settings["lr"]:
        # the LR in the list's place: the run files keep the settings in the order given
        stats = by_lr[lr] = seed_runs(recipe, seeds, runs / f"lr{lr:g}", train, {**settings, "lr": lr}, f"lr {lr:g} ")
        for result in stats.runs:
            result.chose = f"lr {lr:g}"
        print(f"lr {lr:g}: mean {stats.mean:.4f} std {stats.std:.4f}", flush=True)
    return by_lr


def best_lr(by_lr: dict[float, RecipeStats]) -> float:
    """The LR with the best mean final accuracy. Chosen on the val set: generous to the baseline, so a
    recipe that beats it beats it honestly."""
    return max(by_lr, key=lambda lr: by_lr[lr].mean)
