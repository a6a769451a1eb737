"""The benchmark's plots: val accuracy per epoch of one dataset's recipes, and every recipe by regime.
A recipe keeps its colour in every plot."""

from __future__ import annotations

from pathlib import Path

from finetune.bench.results import PLAIN, RECIPES, RecipeStats


def colour_index(recipe: str) -> int:
    """A recipe's colour in every plot (tab10)."""
    names = RECIPES + PLAIN
    return names.index(recipe) if recipe in names else len(names)


def _pyplot():
    """matplotlib's pyplot on the Agg backend: the plots are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stats: dict[str, RecipeStats], path: Path, title: str) -> None:
    plt = _pyplot()
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


def plot_regimes(data: dict[str, dict[str, RecipeStats]], cols: list[str], order: list[str], path: Path) -> None:
    """Bars of each regime (`cols`) of `data` ({regime: {recipe: stats}}), recipes in `order`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(cols)), 4.6))
    colours = plt.get_cmap("tab10")
    for j, c in enumerate(cols):  # each regime's bars side by side, only the recipes that ran there
        ran = [r for r in order if r in data[c]]
        width = 0.84 / len(ran)
        for i, recipe in enumerate(ran):
            s = data[c][recipe]
            ax.bar(j + (i - (len(ran) - 1) / 2) * width, s.mean, width * 0.95, yerr=s.std, capsize=2,
                   color=colours(colour_index(recipe)), label=recipe)
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
