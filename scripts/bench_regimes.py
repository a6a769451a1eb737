"""The transfer benchmark in the five regimes a default recipe must hold in (issue: recipes across
domains): near-ImageNet photos, a far-off domain, textures, and steel defects with few and with many
images per class. Each regime is one `bench_transfer.py` run with `--reuse`, so an interrupted
benchmark (hours on 2 cores) continues where it stopped:

    python scripts/bench_regimes.py                      # every regime, every recipe, 3 seeds
    python scripts/bench_regimes.py --regimes dtd10,neu6_30 --recipes lp_ft,full
    python scripts/bench_regimes.py --plain              # the two plain baselines, every regime
    python scripts/bench_regimes.py --rescore-auto       # auto's probes only, scored by the record's runs

Results: bench_out/regimes/<regime>/ (results.md, results.json, val_acc.png), or --out. `--report` merges
whatever has finished there into the committed record, docs/regimes/ (<regime>.json, a recipe's newer
runs replacing its older), and writes from the record each regime's table (<regime>.md) and plot, and
summary.md (recipe x regime, and where the default loses) and summary.png. To keep working
on the code while it runs, run it from a snapshot: git worktree add /tmp/bench HEAD, then
python /tmp/bench/scripts/bench_regimes.py --out $PWD/bench_out/regimes.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer  # noqa: E402

DATA = bench_transfer.ROOT.parent / "shared" / "data"
OUT = bench_transfer.ROOT / "bench_out" / "regimes"
DOCS = bench_transfer.ROOT / "docs" / "regimes"  # the committed record: every regime's runs, tables, plots


@dataclass(frozen=True)
class Regime:
    folder: str  # under DATA; "digits": the embedded digits, written under --out
    per_class: int | None = None  # train images per class (--train-per-class)
    size: int | None = None  # input size, when not the model's 224


REGIMES = {
    "hymenoptera": Regime("hymenoptera"),
    "digits": Regime("digits", size=96),
    "dtd10": Regime("dtd10"),
    "neu6_30": Regime("neu6", per_class=30),
    "neu6_200": Regime("neu6"),
}


MODEL = bench_transfer.MODEL


def folder(regime: str, model: str = MODEL) -> str:
    """A regime's results folder and record name: the regime, and the backbone when it is not MODEL
    (digits_lite1), so runs of two backbones never share a folder."""
    return regime if model == MODEL else f"{regime}_{model.removeprefix('efficientnet_')}"


def lookup(regime: str) -> Regime:
    if regime not in REGIMES:
        raise SystemExit(f"unknown regime {regime}; choose from {', '.join(REGIMES)}")
    return REGIMES[regime]


def regime_data(regime: str, out: Path) -> Path:
    """The ImageFolder of `regime`; its derived data (digits) under `out`, made if need be."""
    if lookup(regime).folder != "digits":
        return DATA / REGIMES[regime].folder
    if not (out / "digits_data" / "train").is_dir():
        bench_transfer.make_digits(out / "digits_data")
    return out / "digits_data"


def _images(regime: str, out: Path) -> list[str]:
    """--data and --train-per-class of `regime`: the same images for the recipes and the plain baselines."""
    data, per_class = regime_data(regime, out), REGIMES[regime].per_class
    return ["--data", str(data)] + (["--train-per-class", str(per_class)] if per_class else [])


def _overrides(regime: str) -> list[str]:
    """The Hydra overrides of `regime`'s runs (its input size)."""
    size = lookup(regime).size
    return [f"data.image_size={size}"] if size else []


def regime_args(regime: str, out: Path) -> list[str]:
    """bench_transfer's data arguments of `regime`."""
    return _images(regime, out) + [a for o in _overrides(regime) for a in ("--set", o)]


def rescore_auto(regime: str, out: Path, docs: Path, seeds: int, epochs: int, model: str = MODEL):
    """auto in `regime` from its probes alone: each seed's probe, in a child as in the benchmark, and the
    record's run of the recipe it chose with that seed (auto trains exactly its choice, bit for bit:
    tests/test_auto.py). Written to <out>/<regime>/auto_probes/results.json, which --report merges."""
    here = out / folder(regime, model)
    recorded = bench_transfer.load_results(docs / f"{folder(regime, model)}.json")
    data, per_class = regime_data(regime, out), REGIMES[regime].per_class
    if per_class:  # the images bench_transfer's --train-per-class trains on
        data = bench_transfer.train_subset(data, per_class, here)
    runs = []
    for seed in range(seeds):
        cfg = bench_transfer.compose_configs([("auto", seed)], data, epochs, _overrides(regime), model)[("auto", seed)]
        chose, seconds = bench_transfer.probe_auto(cfg, seed, here / "auto_probes", reuse=True)
        trained = [r for r in recorded[chose].runs if r.seed == seed] if chose in recorded else []
        if not trained:
            raise SystemExit(f"{regime}: auto chose {chose} for seed {seed}, which the record has not run; "
                             f"run it: --regimes {regime} --recipes {chose}")
        runs.append(bench_transfer.scored_as_auto(trained[0], chose, seconds))
        print(f"{regime} seed {seed}: auto chose {chose} ({seconds:.0f} s probe)", flush=True)
    stats = {"auto": bench_transfer.RecipeStats("auto", runs)}
    (here / "auto_probes").mkdir(parents=True, exist_ok=True)
    bench_transfer.save_results(stats, here / "auto_probes" / "results.json")
    return stats


def plain_args(regime: str, out: Path) -> list[str]:
    """The plain baselines' data arguments of `regime` (the same images, the same input size)."""
    return _images(regime, out) + ["--size", str(lookup(regime).size or 224)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument("--plain", action="store_true",
                   help="the two plain baselines (scripts/plain_head_only.py, plain_full.py) instead of the recipes")
    p.add_argument("--rescore-auto", action="store_true",
                   help="only auto's probes: score auto by the record's runs of the recipes it chose "
                        "(after a change to the probe; --report then merges them)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--model", default=MODEL, help="a conf/model preset (efficientnet_lite1, ...): results in "
                   "<regime>_lite1/, the record in <regime>_lite1.json and summary_lite1.md")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (one per regime inside)")
    p.add_argument("--report", action="store_true",
                   help="only merge the finished runs in --out into --docs and write its tables and plots")
    p.add_argument("--docs", type=Path, default=DOCS,
                   help="the record --report keeps: <regime>.json, .md and _val_acc.png, summary.md and .png")
    args = p.parse_args(argv)
    regimes = args.regimes.split(",")
    for regime in regimes:
        lookup(regime)  # an unknown regime fails before hours of runs
    if args.report:
        print(report(args.out, regimes, args.docs, args.model))
        return
    if args.rescore_auto:
        for regime in regimes:
            rescore_auto(regime, args.out, args.docs, args.seeds, args.epochs, args.model)
        return
    if args.plain and args.model != MODEL:
        p.error("--plain: the plain baselines train EfficientNet-Lite0 only")
    for regime in regimes:
        print(f"== {regime}", flush=True)
        here = args.out / folder(regime, args.model)
        if args.plain:
            import plain_full
            import plain_head_only

            common = [*plain_args(regime, args.out), "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
            plain_head_only.main([*common, "--out", str(here / "plain_head_only")])
            plain_full.main([*common, "--out", str(here / "plain_full")])
            continue
        extra = ["--recipes", args.recipes] if args.recipes else []
        bench_transfer.main([*regime_args(regime, args.out), "--out", str(here), "--seeds",
                             str(args.seeds), "--epochs", str(args.epochs), "--model", args.model, "--reuse", *extra])


DEFAULT = "auto"  # conf/train.yaml's recipe
NEAR = "lp_ft"  # what auto trains where the pretrained features fit; the default before auto
Results = dict[str, bench_transfer.RecipeStats]


def load(out: Path, regimes: list[str], model: str = MODEL) -> dict[str, Results]:
    """{regime: {recipe: stats}}: the recipes' and the plain baselines' finished results in `out`."""
    data = {}
    for regime in regimes:
        here = out / folder(regime, model)
        # auto_probes last: auto rescored from new probes replaces an older auto of results.json
        files = [here / "results.json", *(here / name / "results.json" for name in (*bench_transfer.PLAIN, "auto_probes"))]
        found = [bench_transfer.load_results(f) for f in files if f.is_file()]
        if found:
            data[regime] = {name: s for results in found for name, s in results.items()}
    return data


def record(new: dict[str, Results], docs: Path, regimes: list[str], model: str = MODEL) -> dict[str, Results]:
    """Merge `new` into the record in `docs` (a recipe's newer runs replace its older ones) and write each
    regime's <regime>.json, .md and _val_acc.png; the whole record of `regimes`."""
    docs.mkdir(parents=True, exist_ok=True)
    merged = {}
    for regime in regimes:
        name = folder(regime, model)
        kept = docs / f"{name}.json"
        results = bench_transfer.load_results(kept) if kept.is_file() else {}
        results.update(new.get(regime, {}))
        if not results:
            continue
        merged[regime] = results
        bench_transfer.save_results(results, kept)
        plot = f"{name}_val_acc.png"
        (docs / f"{name}.md").write_text(
            f"## {name}\n\n{bench_transfer.markdown_table(results)}\n\n![val accuracy per epoch]({plot})\n")
        bench_transfer.plot_curves(results, docs / plot, f"{name}: val accuracy per epoch")
    return merged


def verdict(results: Results, recipe: str = DEFAULT) -> str:
    """Whether `recipe`'s mean is at least every other's (plain baselines included) up to one standard
    error of the difference."""
    if recipe not in results:
        return "not run"
    mine = results[recipe]
    worst = None
    for other, theirs in results.items():
        if other == recipe:
            continue
        gap = theirs.mean - mine.mean
        se = math.hypot(mine.sem, theirs.sem)
        # "up to one standard error" includes it: a gap of exactly one (a single val image out of 599 on
        # neu6) must not turn on the last bit of a float
        if gap > se * (1 + 1e-9) and (worst is None or gap - se > worst[1] - worst[2]):
            worst = (other, gap, se)
    if worst is None:
        return "holds"
    return f"**loses** to {worst[0]} by {worst[1]:.4f} ({worst[1] / max(worst[2], 1e-9):.1f} standard errors)"


def report(out: Path, regimes: list[str], docs: Path = DOCS, model: str = MODEL) -> str:
    """The finished runs in `out` merged into the record in `docs`, and from the record: summary.md and
    summary.png (recipe x regime, mean ± std over seeds, the best of each regime in bold, what auto
    chose, whether the default and auto hold in each regime), each regime's table and plot."""
    data = record(load(out, regimes, model), docs, regimes, model)
    if not data:
        raise SystemExit(f"no results under {out} or {docs}: run the benchmark first")
    cols = list(data)
    order = [r for r in bench_transfer.RECIPES + bench_transfer.PLAIN if any(r in data[c] for c in cols)]
    best = {c: max(s.mean for s in data[c].values()) for c in cols}
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for recipe in order:
        cells = []
        for c in cols:
            s = data[c].get(recipe)
            if s is None:
                cells.append("")
                continue
            cell = f"{s.mean:.3f} ± {s.std:.3f}"
            cell = f"**{cell}**" if s.mean >= best[c] - 1e-9 else cell  # ties: all of them
            chose = [run.chose for run in s.runs if run.chose]
            cells.append(cell + (f" ({', '.join(dict.fromkeys(chose))})" if chose else ""))
        name = f"{recipe} (default)" if recipe == DEFAULT else recipe
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
              f"| default ({DEFAULT}) | " + " | ".join(verdict(data[c]) for c in cols) + " |",
              f"| {NEAR} ({DEFAULT}'s near recipe) | " + " | ".join(verdict(data[c], NEAR) for c in cols) + " |"]
    table = "\n".join(lines)
    summary = folder("summary", model)
    (docs / f"{summary}.md").write_text(table + "\n")
    plot(data, cols, order, docs / f"{summary}.png")
    return table


def plot(data: dict, cols: list[str], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(cols)), 4.6))
    colours = plt.get_cmap("tab10")
    for j, c in enumerate(cols):  # each regime's bars side by side, only the recipes that ran there
        ran = [r for r in order if r in data[c]]
        width = 0.84 / len(ran)
        for i, recipe in enumerate(ran):
            s = data[c][recipe]
            ax.bar(j + (i - (len(ran) - 1) / 2) * width, s.mean, width * 0.95, yerr=s.std, capsize=2,
                   color=colours(bench_transfer.colour_index(recipe)), label=recipe)
    lows = [s.mean for c in cols for s in data[c].values()]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("val accuracy after the last epoch")
    ax.set_title("recipes by regime (mean and std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per recipe, in order
    ax.legend([handles[r] for r in order], order, fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
