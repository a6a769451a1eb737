"""Transfer-learning benchmark: every recipe (experiment preset), same epoch budget, several seeds.

    python scripts/bench_transfer.py                       # hymenoptera, 6 recipes x 3 seeds x 5 epochs
    python scripts/bench_transfer.py --data DIR --out DIR  # any ImageFolder (DIR/train, DIR/val)
    python scripts/bench_transfer.py --quick               # smoke test: 2 recipes, 1 seed, 2 epochs
    python scripts/bench_transfer.py --set data.image_size=96 --set batch_size=16   # extra overrides

Every run is finetune's own `train()` on a config composed from the repo's conf/ exactly as
`finetune train experiment=<recipe> model=efficientnet_lite0 data=imagefolder data.root=... seed=...`
would (offline EfficientNet-Lite0 ImageNet weights). The score of a run is its val accuracy after
the LAST epoch (never the best epoch: picking that would be tuning on the validation set).
Writes into --out: results.json (every run's per-epoch metrics), results.md (the table) and
val_acc.png (val accuracy per epoch, mean over seeds, one line per recipe).

`--make-folds K DIR` writes K cross-validation folds of --data's train/ folder (the images the recipes
may be tuned on) as ImageFolders DIR/fold<i>/{train,val}.
`--train-per-class N` trains every recipe and seed on the same N train images per class (a seeded choice
of the train/ folder, as symlinks under --out; val/ unchanged): the few-shot regime.
`--make-digits DIR` writes the embedded 8x8 digits (a far-off domain; `data=digits`) as an ImageFolder:
run the benchmark with --data DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

RECIPES = ("linear_probe", "full", "discriminative", "gradual", "fine_tune", "lp_ft", "freezeout", "auto")
QUICK_RECIPES = ("linear_probe", "fine_tune")
# the hand-written baselines (scripts/plain_*.py): reported beside the recipes, in the same format
PLAIN = ("plain_head_only", "plain_full")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
MODEL = "efficientnet_lite0"  # the benchmark's backbone: offline ImageNet weights
DEFAULT_OUT = ROOT / "bench_out" / "transfer"


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


def colour_index(recipe: str) -> int:
    """A recipe's colour in every plot (tab10)."""
    names = RECIPES + PLAIN
    return names.index(recipe) if recipe in names else len(names)


def cached_run(path: Path, settings: dict, train) -> RunResult:
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


# --------------------------------------------------------------------------------------- configs


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
    """{(recipe, seed): composed config} from the repo's conf/, as the CLI would compose it."""
    from hydra import compose, initialize_config_dir

    from finetune.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return {
            (recipe, seed): compose("train", overrides=overrides_for(recipe, seed, data, epochs, extra, model))
            for recipe, seed in runs
        }


# ----------------------------------------------------------------------------------------- running


def read_val_acc(run_dir: Path) -> list[float]:
    import csv

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

    from finetune.engine.checkpoint import flatten

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


# ----------------------------------------------------------------------------------------- reports


def table_rows(stats: dict[str, RecipeStats]) -> list[tuple[str, ...]]:
    """(recipe, mean, std, per-seed finals, wall s per run), best mean first."""
    ordered = sorted(stats.values(), key=lambda s: -s.mean)
    return [
        (s.label, f"{s.mean:.4f}", f"{s.std:.4f}", " ".join(f"{a:.3f}" for a in s.finals), f"{s.wall:.0f}")
        for s in ordered
    ]


HEADER = ("recipe", "val acc mean", "std", "per seed", "wall s / run")


def markdown_table(stats: dict[str, RecipeStats]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---", "---:", "---:", "---", "---:"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(stats)]
    return "\n".join(lines)


def markdown_report(stats: dict[str, RecipeStats], args, n_train: int, n_val: int) -> str:
    import platform

    import timm
    import torch

    seeds = len(next(iter(stats.values())).runs)
    extra = " ".join(f"--set {s}" for s in args.set) or "none"
    return (
        f"## Transfer benchmark: {args.name}\n\n"
        f"model={args.model} (offline ImageNet weights), {args.epochs} epochs, {seeds} seed(s), "
        f"{n_train} train / {n_val} val images; score = val accuracy after the last epoch "
        f"(std over seeds). Extra overrides: {extra}. CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, timm {timm.__version__} (runs repeat "
        f"bit for bit on the same versions, not across them).\n\n"
        f"{markdown_table(stats)}\n\n![val accuracy per epoch](val_acc.png)\n"
    )


def plot_curves(stats: dict[str, RecipeStats], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.get_cmap("tab10")
    for s in sorted(stats.values(), key=lambda s: -s.mean):
        curve = s.curve()
        colour = colours(colour_index(s.recipe))
        # auto repeats the run of the recipe it chose: dashed, so the line under it stays visible
        ax.plot(range(1, len(curve) + 1), curve, marker="o", color=colour, label=f"{s.label} ({s.mean:.3f})",
                linestyle="--" if s.recipe == "auto" else "-", markersize=4 if s.recipe == "auto" else 6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (mean over seeds)")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(stats: dict[str, RecipeStats]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="transfer benchmark (val acc after the last epoch)")
    for col in HEADER:
        table.add_column(col, justify="left" if col in ("recipe", "per seed") else "right")
    for row in table_rows(stats):
        table.add_row(*row)
    Console().print(table)


# ----------------------------------------------------------------------------------------- digits


def make_digits(out: Path, train_per_class: int = 30, val_per_class: int = 50, size: int = 32) -> None:
    """The embedded digits (finetune/assets: 1797 8x8 images, 10 classes) as an ImageFolder of `size` px
    PNGs: the same fixed per-class split as `data=digits` (train_per_class / val_per_class images)."""
    from finetune.data.datasets import digits_split

    for split in ("train", "val"):
        for i, (image, digit) in enumerate(digits_split(split, train_per_class, val_per_class, size)):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
    print(f"wrote {out} ({train_per_class}/{val_per_class} train/val images per class)")


# ------------------------------------------------------------------------------------------ folds

FOLD_SEED = 123  # the folds of the README's tuning runs


def fold_of(files: list[str], k: int, seed: int = FOLD_SEED) -> dict[str, int]:
    """{file: fold} for one class: a seeded shuffle dealt round-robin into k folds (sizes differ by <= 1)."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    return {f: i % k for i, f in enumerate(order)}


def train_subset(data: Path, per_class: int, out: Path) -> Path:
    """--train-per-class's ImageFolder of `data`, in the benchmark folder `out`."""
    return subset(data, per_class, out / f"data_{per_class}_per_class")


def subset(data: Path, per_class: int, out: Path, seed: int = FOLD_SEED) -> Path:
    """An ImageFolder at `out` with `per_class` train images of each class of `data` (the first of a
    seeded shuffle: the same files for every recipe, seed and rerun) and `data`'s val/ as it is."""
    source = data / "train"
    for cls in sorted(p.name for p in source.iterdir() if p.is_dir()):
        files = sorted(p.name for p in (source / cls).iterdir() if p.is_file())
        if len(files) < per_class:
            raise SystemExit(f"--train-per-class {per_class}: class {cls} has only {len(files)} train images")
        random_order = files[:]
        random.Random(seed).shuffle(random_order)
        folder = out / "train" / cls
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in random_order[:per_class]:
            (folder / name).symlink_to((source / cls / name).resolve())
    val = out / "val"
    if not val.exists():
        val.symlink_to((data / "val").resolve())
    return out


def make_folds(data: Path, out: Path, k: int, seed: int = FOLD_SEED) -> None:
    """K-fold cross-validation of `data`/train as K ImageFolders out/fold<i>/{train,val} (symlinks),
    stratified per class: tune on these, never on `data`/val."""
    if k < 2:
        raise SystemExit(f"--make-folds needs at least 2 folds, got {k}")
    source = data / "train"
    if not source.is_dir():
        raise SystemExit(f"--data {data}: no train/ folder to split")
    for cls in sorted(p.name for p in source.iterdir() if p.is_dir()):
        folds = fold_of([p.name for p in (source / cls).iterdir() if p.is_file()], k, seed)
        for i in range(k):
            for split in ("train", "val"):
                (out / f"fold{i}" / split / cls).mkdir(parents=True, exist_ok=True)
            for name, fold in folds.items():
                link = out / f"fold{i}" / ("val" if fold == i else "train") / cls / name
                if not link.exists():
                    link.symlink_to((source / cls / name).resolve())
    print(f"wrote {k} folds of {source} to {out}/fold0..fold{k - 1}")


# -------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--recipes", default=None, help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...); default 3")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="seeds K, K+1, ...: more seeds beside a finished benchmark's, in another --out")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget of every recipe; default 5")
    p.add_argument("--model", default=MODEL,
                   help="a conf/model preset: efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every run (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {', '.join(QUICK_RECIPES)}, 1 seed, 2 epochs")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs in --out whose composed config is unchanged")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N",
                   help="train on the same N images per class of --data's train/ (few-shot regime)")
    p.add_argument("--make-digits", type=Path, metavar="DIR", help="write the digits ImageFolder to DIR and exit")
    p.add_argument("--digits-train", type=int, default=30, metavar="N",
                   help="--make-digits: train images per class (default 30; at most 120 with 50 val)")
    p.add_argument("--make-folds", nargs=2, metavar=("K", "DIR"),
                   help="write K cross-validation folds of --data's train/ to DIR/fold<i> and exit")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",") if args.recipes else list(QUICK_RECIPES if args.quick else RECIPES)
    unknown = sorted(set(recipes) - set(RECIPES) - {"none"})
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    args.recipes = recipes
    args.seeds = args.seeds or (1 if args.quick else 3)
    if args.first_seed < 0:
        p.error(f"--first-seed must be >= 0, got {args.first_seed}")
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.data = args.data.expanduser().resolve()
    return args


def count_images(root: Path) -> tuple[int, int]:
    return tuple(sum(1 for p in (root / split).rglob("*") if p.is_file()) for split in ("train", "val"))


def main(argv=None) -> dict[str, RecipeStats]:
    args = parse_args(argv)
    if args.make_digits:
        make_digits(args.make_digits, train_per_class=args.digits_train)
        return {}
    if args.make_folds:
        make_folds(args.data, Path(args.make_folds[1]).expanduser(), int(args.make_folds[0]))
        return {}
    if not (args.data / "train").is_dir():
        raise SystemExit(f"--data {args.data}: no train/ folder (an ImageFolder root has train/ and val/)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.name = args.data.name
    if args.train_per_class:
        args.name = f"{args.data.name}, {args.train_per_class} train images per class"
        args.data = train_subset(args.data, args.train_per_class, args.out)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [(recipe, seed) for recipe in args.recipes for seed in seeds]
    configs = compose_configs(runs, args.data, args.epochs, args.set, args.model)
    stats = run_all(configs, args.out, args.reuse, lambda name, seed: compose_configs(
        [(name, seed)], args.data, args.epochs, args.set, args.model)[(name, seed)])
    # the report covers every recipe finished in --out for these seeds, not only this invocation's
    others = [(r, seed) for r in RECIPES if r not in stats and r != "auto" for seed in seeds]
    stats.update(finished(compose_configs(others, args.data, args.epochs, args.set, args.model), args.out))
    print_table(stats)
    n_train, n_val = count_images(args.data)
    (args.out / "results.md").write_text(markdown_report(stats, args, n_train, n_val))
    save_results(stats, args.out / "results.json")
    plot_curves(stats, args.out / "val_acc.png", f"{args.name}: val accuracy per epoch")
    print(f"wrote {args.out / 'results.md'}, results.json and val_acc.png")
    return stats


if __name__ == "__main__":
    main()
