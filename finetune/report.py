"""What a run leaves in its directory: lr_trace.csv, metrics.csv, lr_trace.png, summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from finetune.errors import writing

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s")
# with a weight average (ema_half_life), val_* score the average and these the live model
EMA_METRIC_FIELDS = ("live_val_loss", "live_val_acc")
# evals.csv (eval_every): every evaluation, mid-epoch ones and the epoch ends'
EVAL_FIELDS = ("step", "epoch", "val_loss", "val_acc")


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    with writing(path), open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, obj) -> None:
    with writing(path):
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def plot_lr_trace(path: Path, trace: Sequence[dict], group_names: Sequence[str], steps_per_epoch: int) -> None:
    """Every group's LR against the step (log scale), frozen stretches dotted, freeze changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    changes = set()
    for name in group_names:
        rows = [r for r in trace if r["group"] == name]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        lrs = [r["lr"] for r in rows]
        line, = ax.plot(steps, [lr if r["trainable"] else None for lr, r in zip(lrs, rows)], label=name)
        ax.plot(steps, [None if r["trainable"] else lr for lr, r in zip(lrs, rows)],
                linestyle=":", color=line.get_color(), alpha=0.6)
        for prev, cur in zip(rows, rows[1:]):
            if prev["trainable"] != cur["trainable"]:
                changes.add(cur["step"])
    for step in sorted(changes):
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"unfreeze @ epoch {step // max(1, steps_per_epoch)}", (step, 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("LR per layer group (dotted: frozen)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2)
