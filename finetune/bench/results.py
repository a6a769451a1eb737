"""What a benchmark run gives (val accuracy per epoch, wall time), a recipe's runs over seeds, and
results.json, the file that keeps them: {recipe: [run, ...]}."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# every recipe the benchmark runs, in the order of the summary's rows and the plots' colours
RECIPES = ("linear_probe", "full", "discriminative", "gradual", "fine_tune", "lp_ft", "freezeout", "auto")
# --quick's smoke test
QUICK_RECIPES = ("linear_probe", "fine_tune")
# the hand-written baselines (scripts/plain_*.py): reported beside the recipes, in the same format
PLAIN = ("plain_head_only", "plain_full")


@dataclass
class RunResult:
    recipe: str
    seed: int
    val_acc: list[float]  # per epoch
    wall_seconds: float
    train_images_per_second: float | None = None
    chose: str | None = None  # experiment=auto: the recipe its probe chose; plain_full: the LR val chose

    @property
    def final(self) -> float:
        return self.val_acc[-1]


@dataclass
class RecipeStats:
    recipe: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def finals(self) -> list[float]:
        return [r.final for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals)

    @property
    def std(self) -> float:
        # sample std over seeds (0 with a single seed)
        return statistics.stdev(self.finals) if len(self.finals) > 1 else 0.0

    @property
    def label(self) -> str:
        """The recipe, and what was chosen in each seed (once when every seed chose the same)."""
        chosen = [r.chose for r in self.runs if r.chose]
        chosen = chosen[:1] if len(set(chosen)) == 1 else chosen
        return f"{self.recipe} ({', '.join(chosen)})" if chosen else self.recipe

    @property
    def wall(self) -> float:
        return statistics.fmean(r.wall_seconds for r in self.runs)

    def curve(self) -> list[float]:
        """Mean val accuracy per epoch over seeds."""
        return [statistics.fmean(c) for c in zip(*(r.val_acc for r in self.runs))]

    @property
    def sem(self) -> float:
        """Standard error of the mean."""
        return self.std / math.sqrt(len(self.runs))


def load_results(path: Path) -> dict[str, RecipeStats]:
    """A results.json ({recipe: [run, ...]}) as RecipeStats."""
    return {name: RecipeStats(name, [RunResult(**run) for run in runs])
            for name, runs in json.loads(path.read_text()).items()}


def save_results(stats: dict[str, RecipeStats], path: Path) -> None:
    path.write_text(json.dumps({name: [r.__dict__ for r in s.runs] for name, s in stats.items()}, indent=2) + "\n")


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def resumable_runs(done: Path, seeds: list[int], methods: list[str], run_one) -> list[dict]:
    """Every method x seed through `run_one(method, seed) -> row`, each row appended to `done` (JSON lines)
    as it lands; rows already there are kept and not run again (a benchmark stopped midway continues)."""
    import json

    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    for seed in seeds:
        for method in methods:
            if any(r["method"] == method and r["seed"] == seed for r in rows):
                continue
            row = run_one(method, seed)
            rows.append(row)
            with open(done, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return rows


def train_on_label_files(files: Path, overrides: list[str], seed: int, out: Path) -> tuple[dict, float]:
    """One run in this process on FILES/train.csv and FILES/val.csv (data=csv) with `overrides`: its summary
    and wall seconds."""
    import time

    import finetune

    cfg = finetune.compose(["data=csv", f"data.train={files / 'train.csv'}", f"data.val={files / 'val.csv'}",
                            f"seed={seed}", "progress=false", *overrides])
    t0 = time.perf_counter()
    summary = finetune.train(cfg, out)
    return summary, round(time.perf_counter() - t0, 1)
