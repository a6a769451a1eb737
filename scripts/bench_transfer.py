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

This is the benchmark's command line; what it does is finetune.bench's (runs, images, tables, plots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from finetune.bench.images import count_images, make_digits, make_folds, train_subset  # noqa: E402
from finetune.bench.plots import plot_curves  # noqa: E402
from finetune.bench.results import QUICK_RECIPES, RECIPES, RecipeStats, save_results  # noqa: E402
from finetune.bench.runs import MODEL, compose_configs, finished, run_all  # noqa: E402
from finetune.bench.tables import markdown_report, print_table  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
DEFAULT_OUT = ROOT / "bench_out" / "transfer"


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
    (args.out / "results.md").write_text(markdown_report(stats, args.name, args.model, args.epochs, args.set,
                                                         n_train, n_val))
    save_results(stats, args.out / "results.json")
    plot_curves(stats, args.out / "val_acc.png", f"{args.name}: val accuracy per epoch")
    print(f"wrote {args.out / 'results.md'}, results.json and val_acc.png")
    return stats


if __name__ == "__main__":
    main()
