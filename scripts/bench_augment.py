"""Augmentation and regularisation options, each against the same recipe without it, in several regimes
(issue: recipes across domains; an option enters a default only after this):

    python scripts/bench_augment.py                                   # hymenoptera and digits, lp_ft, 3 seeds
    python scripts/bench_augment.py --regimes dtd10 --options none,randaugment --recipe full

Each (regime, option) is one `bench_transfer.py` run with `--reuse` (finished runs are kept), under
--out/<regime>/<option>/. Prints and writes --out/results.md: val accuracy after the last epoch, mean ±
std over seeds, and each option's change against `none` in the same regime, with the seeds paired.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_regimes  # noqa: E402
import bench_transfer  # noqa: E402

from finetune.bench.regimes import regime_args  # noqa: E402
from finetune.bench.results import RecipeStats, save_results  # noqa: E402

OPTIONS = {
    "none": [],
    "randaugment": ["data.auto_augment=rand-m9-mstd0.5-inc1"],  # timm's RandAugment, magnitude 9
    "erasing": ["data.re_prob=0.25"],  # timm's random erasing, a quarter of the images
    "mixup": ["data.mixup=0.2"],
    "cutmix": ["data.cutmix=1.0"],
    "drop_path": ["model.drop_path_rate=0.1"],
}
OUT = bench_transfer.ROOT / "bench_out" / "augment"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default="hymenoptera,digits")
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--recipe", default="lp_ft")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    options = args.options.split(",")
    if "none" not in options:
        options.insert(0, "none")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        p.error(f"unknown option(s) {unknown}; choose from {', '.join(OPTIONS)}")
    results: dict[tuple[str, str], RecipeStats] = {}
    for regime in args.regimes.split(","):
        where = regime_args(regime, bench_regimes.DATA, args.out)
        for option in options:
            print(f"== {regime}: {option}", flush=True)
            sets = [a for s in OPTIONS[option] for a in ("--set", s)]
            stats = bench_transfer.main([*where, "--recipes", args.recipe, "--seeds", str(args.seeds), "--reuse",
                                         "--out", str(args.out / regime / option), *sets])
            results[regime, option] = stats[args.recipe]
    table = report(results, args.regimes.split(","), options, args.recipe)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    save_results({f"{r}/{o}": s for (r, o), s in results.items()}, args.out / "results.json")
    return results


def report(results: dict, regimes: list[str], options: list[str], recipe: str) -> str:
    """Markdown: option x regime, mean ± std and the mean paired change against none."""
    lines = [f"recipe `{recipe}`, val accuracy after the last epoch, mean ± std over seeds (change against none, "
             "seeds paired)", "", "| option | " + " | ".join(regimes) + " |", "|---|" + "---:|" * len(regimes)]
    for option in options:
        cells = []
        for regime in regimes:
            s, base = results[regime, option], results[regime, "none"]
            cell = f"{s.mean:.4f} ± {s.std:.4f}"
            if option != "none":
                cell += f" ({statistics.fmean(a - b for a, b in zip(s.finals, base.finals)):+.4f})"
            cells.append(cell)
        lines.append(f"| {option} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
