"""Running the benchmark: each (recipe, seed) is finetune's own `train()` on a config composed from conf/
exactly as `finetune train experiment=<recipe> ...` composes it, in a child process of its own; a
finished run whose config is unchanged is reused, so an interrupted benchmark continues."""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
import time
from pathlib import Path

from finetune.bench.results import RecipeStats, RunResult

MODEL = "efficientnet_lite0"  # the benchmark's backbone: offline ImageNet weights


def overrides_for(recipe: str, seed: int, data: Path, epochs: int, extra: list[str],
                  model: str = MODEL) -> list[str]:
    """Hydra overrides of one run; `extra` (user --set values) comes last, so it wins."""
    return [
        f"experiment={recipe}",
        f"model={model}",
        "data=imagefolder",
        f"data.root={data}",
        f"epochs={epochs}",
        f"seed={seed}",
        "progress=false",
        # same numbers, ~1.5x faster on our 2-core CPU (finetune turns it on for CUDA only)
        "channels_last=true",
        *extra,
    ]


def compose_configs(runs: list[tuple[str, int]], data: Path, epochs: int, extra: list[str],
                    model: str = MODEL) -> dict:
    """{(recipe, seed): composed config} from conf/, as the CLI would compose it."""
    from hydra import compose, initialize_config_dir

    from finetune.config.presets import conf_dir
    from finetune.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return {
            (recipe, seed): compose("train", overrides=overrides_for(recipe, seed, data, epochs, extra, model))
            for recipe, seed in runs
        }


def read_val_acc(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["val_acc"]) for row in csv.DictReader(f)]


def _train_child(cfg, run_dir: Path) -> None:
    """Child-process body: train, then drop the checkpoint (~40 MB, not needed here)."""
    from finetune.commands.train import train

    summary = train(cfg, run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "bench_summary.json").write_text(json.dumps(summary))


def same_run(old, new) -> bool:
    """A finished run's config describes this run: every setting both configs have is equal. Keys only
    the newer config has are settings added to finetune since, whose defaults keep what runs compute."""
    from omegaconf import OmegaConf

    from finetune.config.recipe import flatten

    a = flatten(OmegaConf.to_container(old, resolve=True))
    b = flatten(OmegaConf.to_container(new, resolve=True))
    return all(a[k] == b[k] for k in a.keys() & b.keys()) and not (a.keys() - b.keys())


def _probe_child(cfg, run_dir: Path) -> None:
    from finetune.recipes import auto

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "auto.json").write_text(json.dumps(auto.choose(cfg), indent=2) + "\n")


def _in_child(target, *args) -> float:
    """Run target(*args) in a forked child; its wall seconds."""
    # fork: the parent has run no torch op (no thread pools to inherit) and the child may start loader workers
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    start = time.perf_counter()
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{target.__name__} of {args[-1]} failed (exit code {child.exitcode}); see above")
    return time.perf_counter() - start


def _fresh(run_dir: Path, cfg) -> None:
    from omegaconf import OmegaConf

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "bench_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _finished(run_dir: Path, cfg, marker: str) -> bool:
    from omegaconf import OmegaConf

    return (run_dir / marker).is_file() and same_run(OmegaConf.load(run_dir / "bench_config.yaml"), cfg)


def run_auto(cfg, seed: int, out: Path, reuse: bool, compose) -> RunResult:
    """experiment=auto: its probe (in a child), then the chosen recipe's run. `finetune train experiment=auto`
    trains exactly experiment=<choice> (bit for bit: tests/test_auto.py), so that recipe's finished run
    with the same seed is reused; the score is its score, the wall time its time plus the probe's."""
    chose, probe_seconds = probe_auto(cfg, seed, out, reuse)
    trained = run_one(compose(chose, seed), chose, seed, out / "runs" / chose / f"seed{seed}", reuse)
    return scored_as_auto(trained, chose, probe_seconds)


def probe_auto(cfg, seed: int, out: Path, reuse: bool) -> tuple[str, float]:
    """experiment=auto's probe alone, in a child (out/runs/auto/seed<i>/auto.json): (its choice, seconds)."""
    run_dir = out / "runs" / "auto" / f"seed{seed}"
    if not (reuse and _finished(run_dir, cfg, "probe_seconds.txt")):
        _fresh(run_dir, cfg)
        (run_dir / "probe_seconds.txt").write_text(f"{_in_child(_probe_child, cfg, run_dir):.1f}\n")
    chose = json.loads((run_dir / "auto.json").read_text())["recipe"]
    return chose, float((run_dir / "probe_seconds.txt").read_text())


def scored_as_auto(trained: RunResult, chose: str, probe_seconds: float) -> RunResult:
    """auto's result: the run of the recipe it chose, its wall time plus the probe's."""
    return RunResult("auto", trained.seed, trained.val_acc, round(trained.wall_seconds + probe_seconds, 1),
                     trained.train_images_per_second, chose)


def run_one(cfg, recipe: str, seed: int, run_dir: Path, reuse: bool) -> RunResult:
    """Train one configuration in a fresh child process (or reuse a finished run whose config is
    identical). The child gives every byte back when it exits: one process training 18 models in a row
    grows (allocator caching, loader workers alive until garbage collection) on a machine that is short
    of memory."""
    done = run_dir / "bench_result.json"
    if reuse and _finished(run_dir, cfg, done.name):
        return RunResult(**json.loads(done.read_text()))
    _fresh(run_dir, cfg)
    wall = _in_child(_train_child, cfg, run_dir)  # model build, data, training and every epoch's evaluation
    summary = json.loads((run_dir / "bench_summary.json").read_text())
    result = RunResult(recipe, seed, read_val_acc(run_dir), round(wall, 1), summary.get("train_images_per_second"))
    done.write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return result


def run_all(configs: dict, out: Path, reuse: bool, compose=None) -> dict[str, RecipeStats]:
    """Every (recipe, seed) run; `compose(recipe, seed)` composes a config (for the recipe auto chose)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    stats: dict[str, RecipeStats] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("runs", total=len(configs))
        for (recipe, seed), cfg in configs.items():
            bar.update(task, description=f"{recipe} seed {seed}")
            if recipe == "auto":
                result = run_auto(cfg, seed, out, reuse, compose)
            else:
                result = run_one(cfg, recipe, seed, out / "runs" / recipe / f"seed{seed}", reuse)
            stats.setdefault(recipe, RecipeStats(recipe)).runs.append(result)
            curve = " ".join(f"{a:.3f}" for a in result.val_acc)
            console.print(f"{time.strftime('%H:%M:%S')} {recipe:>15} seed {seed}: val acc per epoch {curve} "
                          f"({result.wall_seconds:.0f} s)", soft_wrap=True, highlight=False)
            bar.advance(task)
    return stats


def finished(configs: dict, out: Path) -> dict[str, RecipeStats]:
    """The recipes of `configs` whose every seed has a finished run in `out` with the same config."""
    stats: dict[str, RecipeStats] = {}
    for recipe in dict.fromkeys(r for r, _ in configs):
        dirs = {seed: out / "runs" / recipe / f"seed{seed}" for r, seed in configs if r == recipe}
        if all(_finished(d, configs[recipe, seed], "bench_result.json") for seed, d in dirs.items()):
            stats[recipe] = RecipeStats(recipe, [RunResult(**json.loads((d / "bench_result.json").read_text()))
                                                 for d in dirs.values()])
    return stats
