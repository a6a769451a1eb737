"""The transfer benchmark in the five regimes a default recipe must hold in (issue: recipes across
domains): near-ImageNet photos, a far-off domain, textures, and steel defects with few and with many
images per class. Each regime is one `bench_transfer.py` run with `--reuse`, so an interrupted
benchmark (hours on 2 cores) continues where it stopped:

    python scripts/bench_regimes.py                      # every regime, every recipe, 3 seeds
    python scripts/bench_regimes.py --regimes dtd10,neu6_30 --recipes lp_ft,full

Results: bench_out/regimes/<regime>/ (results.md, results.json, val_acc.png), or --out; `--report` writes
summary.md (recipe x regime, and where the default loses) and summary.png from whatever has finished. To keep working
on the code while it runs, run it from a snapshot: git worktree add /tmp/bench HEAD, then
python /tmp/bench/scripts/bench_regimes.py --out $PWD/bench_out/regimes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer  # noqa: E402

DATA = bench_transfer.ROOT.parent / "shared" / "data"
OUT = bench_transfer.ROOT / "bench_out" / "regimes"
# regime -> bench_transfer arguments (data, train images per class, image size)
REGIMES = {
    "hymenoptera": ["--data", str(DATA / "hymenoptera")],
    "digits": ["--data", str(OUT / "digits_data"), "--set", "data.image_size=96"],
    "dtd10": ["--data", str(DATA / "dtd10")],
    "neu6_30": ["--data", str(DATA / "neu6"), "--train-per-class", "30"],
    "neu6_200": ["--data", str(DATA / "neu6")],
}


def regime_args(regime: str, out: Path) -> list[str]:
    """bench_transfer's data arguments of `regime`, its derived data (digits) under `out`, made if need be."""
    if regime not in REGIMES:
        raise SystemExit(f"unknown regime {regime}; choose from {', '.join(REGIMES)}")
    if regime == "digits" and not (out / "digits_data" / "train").is_dir():
        bench_transfer.make_digits(out / "digits_data")
    return [a.replace(str(OUT), str(out)) for a in REGIMES[regime]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="efficientnet_lite0", help="a conf/model preset (efficientnet_lite1, ...)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (one per regime inside)")
    p.add_argument("--report", action="store_true", help="only write summary.md and summary.png from finished runs")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out, args.regimes.split(",")))
        return
    for regime in args.regimes.split(","):
        where = regime_args(regime, args.out)
        extra = ["--recipes", args.recipes] if args.recipes else []
        print(f"== {regime}", flush=True)
        bench_transfer.main([*where, "--out", str(args.out / regime), "--seeds", str(args.seeds),
                             "--model", args.model, "--reuse", *extra])


DEFAULT = "lp_ft"  # conf/train.yaml's recipe


def load(out: Path, regimes: list[str]) -> dict[str, dict[str, list[dict]]]:
    """{regime: {recipe: [run, ...]}} of the regimes with results in `out`."""
    return {r: json.loads((out / r / "results.json").read_text()) for r in regimes
            if (out / r / "results.json").is_file()}


def finals(runs: list[dict]) -> list[float]:
    return [run["val_acc"][-1] for run in runs]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(results: dict[str, list[dict]], recipe: str = DEFAULT) -> str:
    """Whether `recipe`'s mean is at least every other's up to one standard error of the difference."""
    if recipe not in results:
        return "not run"
    mine = finals(results[recipe])
    worst = None
    for other, runs in results.items():
        if other == recipe:
            continue
        theirs = finals(runs)
        gap = statistics.fmean(theirs) - statistics.fmean(mine)
        se = math.sqrt(mean_std(mine)[1] ** 2 / len(mine) + mean_std(theirs)[1] ** 2 / len(theirs))
        if gap > se and (worst is None or gap - se > worst[1] - worst[2]):
            worst = (other, gap, se)
    if worst is None:
        return "holds"
    return f"**loses** to {worst[0]} by {worst[1]:.4f} ({worst[1] / max(worst[2], 1e-9):.1f} standard errors)"


def report(out: Path, regimes: list[str]) -> str:
    """summary.md and summary.png in `out`: recipe x regime, mean ± std over seeds, the best of each
    regime in bold, what auto chose, and whether the default holds in each regime."""
    data = load(out, regimes)
    if not data:
        raise SystemExit(f"no results under {out}: run the benchmark first")
    cols = list(data)
    order = [r for r in bench_transfer.RECIPES if any(r in data[c] for c in cols)]
    best = {c: max(statistics.fmean(finals(runs)) for runs in data[c].values()) for c in cols}
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for recipe in order:
        cells = []
        for c in cols:
            if recipe not in data[c]:
                cells.append("")
                continue
            m, sd = mean_std(finals(data[c][recipe]))
            cell = f"{m:.3f} ± {sd:.3f}"
            cell = f"**{cell}**" if m >= best[c] - 1e-9 else cell  # ties: all of them
            chose = [run.get("chose") for run in data[c][recipe] if run.get("chose")]
            cells.append(cell + (f" ({', '.join(dict.fromkeys(chose))})" if chose else ""))
        name = f"{recipe} (default)" if recipe == DEFAULT else recipe
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
              f"| default ({DEFAULT}) | " + " | ".join(verdict(data[c]) for c in cols) + " |",
              "| auto | " + " | ".join(verdict(data[c], "auto") for c in cols) + " |"]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    plot(data, cols, order, out / "summary.png")
    return table


def plot(data: dict, cols: list[str], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cols)), 4.2))
    colours = plt.get_cmap("tab10")
    width = 0.8 / len(order)
    for i, recipe in enumerate(order):
        xs, ms, sds = [], [], []
        for j, c in enumerate(cols):
            if recipe in data[c]:
                m, sd = mean_std(finals(data[c][recipe]))
                xs.append(j + (i - (len(order) - 1) / 2) * width)
                ms.append(m)
                sds.append(sd)
        ax.bar(xs, ms, width, yerr=sds, capsize=2, label=recipe, color=colours(bench_transfer.RECIPES.index(recipe)))
    lows = [mean_std(finals(runs))[0] for c in cols for runs in data[c].values()]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("val accuracy after the last epoch")
    ax.set_title("recipes by regime (mean and std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
