"""A benchmark's results as tables: each recipe's val accuracy after the last epoch (the score: never the
best epoch, which would be tuning on the validation set), best mean first."""

from __future__ import annotations

from finetune.bench.results import RecipeStats

HEADER = ("recipe", "val acc mean", "std", "per seed", "wall s / run")


def table_rows(stats: dict[str, RecipeStats]) -> list[tuple[str, ...]]:
    """(recipe, mean, std, per-seed finals, wall s per run), best mean first."""
    ordered = sorted(stats.values(), key=lambda s: -s.mean)
    return [
        (s.label, f"{s.mean:.4f}", f"{s.std:.4f}", " ".join(f"{a:.3f}" for a in s.finals), f"{s.wall:.0f}")
        for s in ordered
    ]


def markdown_table(stats: dict[str, RecipeStats]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---", "---:", "---:", "---", "---:"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(stats)]
    return "\n".join(lines)


def markdown_report(stats: dict[str, RecipeStats], name: str, model: str, epochs: int, overrides: list[str],
                    n_train: int, n_val: int) -> str:
    """results.md of a benchmark of `name` (the dataset): its settings, the versions whose runs repeat bit
    for bit, the table and the plot of val accuracy per epoch (val_acc.png beside it)."""
    import platform

    import timm
    import torch

    seeds = len(next(iter(stats.values())).runs)
    extra = " ".join(f"--set {s}" for s in overrides) or "none"
    return (
        f"## Transfer benchmark: {name}\n\n"
        f"model={model} (offline ImageNet weights), {epochs} epochs, {seeds} seed(s), "
        f"{n_train} train / {n_val} val images; score = val accuracy after the last epoch "
        f"(std over seeds). Extra overrides: {extra}. CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, timm {timm.__version__} (runs repeat "
        f"bit for bit on the same versions, not across them).\n\n"
        f"{markdown_table(stats)}\n\n![val accuracy per epoch](val_acc.png)\n"
    )


def print_table(stats: dict[str, RecipeStats]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="transfer benchmark (val acc after the last epoch)")
    for col in HEADER:
        table.add_column(col, justify="left" if col in ("recipe", "per seed") else "right")
    for row in table_rows(stats):
        table.add_row(*row)
    Console().print(table)
