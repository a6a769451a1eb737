"""The benchmark's record (docs/regimes/ in the repo): every regime's runs, <regime>.json, with its table
and plot, and the summary of recipe x regime that says where the default holds. New runs are merged in,
a recipe's newer runs replacing its older ones."""

from __future__ import annotations

import math
from pathlib import Path

from finetune.bench.plots import plot_curves, plot_regimes
from finetune.bench.regimes import folder
from finetune.bench.results import (
    PLAIN,
    RECIPES,
    RecipeStats,
    load_results,
    save_results,
)
from finetune.bench.runs import MODEL
from finetune.bench.tables import markdown_table

DEFAULT = "auto"  # conf/train.yaml's recipe
NEAR = "lp_ft"  # what auto trains where the pretrained features fit; the default before auto
Results = dict[str, RecipeStats]


def load(out: Path, regimes: list[str], model: str = MODEL) -> dict[str, Results]:
    """{regime: {recipe: stats}}: the recipes' and the plain baselines' finished results in `out`."""
    data = {}
    for regime in regimes:
        here = out / folder(regime, model)
        # auto_probes last: auto rescored from new probes replaces an older auto of results.json
        files = [here / "results.json", *(here / name / "results.json" for name in (*PLAIN, "auto_probes"))]
        found = [load_results(f) for f in files if f.is_file()]
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
        results = load_results(kept) if kept.is_file() else {}
        results.update(new.get(regime, {}))
        if not results:
            continue
        merged[regime] = results
        save_results(results, kept)
        plot = f"{name}_val_acc.png"
        (docs / f"{name}.md").write_text(
            f"## {name}\n\n{markdown_table(results)}\n\n![val accuracy per epoch]({plot})\n")
        plot_curves(results, docs / plot, f"{name}: val accuracy per epoch")
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


def report(out: Path, regimes: list[str], docs: Path, model: str = MODEL) -> str:
    """The finished runs in `out` merged into the record in `docs`, and from the record: summary.md and
    summary.png (recipe x regime, mean ± std over seeds, the best of each regime in bold, what auto
    chose, whether the default and auto hold in each regime), each regime's table and plot."""
    data = record(load(out, regimes, model), docs, regimes, model)
    if not data:
        raise SystemExit(f"no results under {out} or {docs}: run the benchmark first")
    cols = list(data)
    order = [r for r in RECIPES + PLAIN if any(r in data[c] for c in cols)]
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
    plot_regimes(data, cols, order, docs / f"{summary}.png")
    return table
