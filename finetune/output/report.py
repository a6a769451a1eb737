"""What a run and its evaluation leave on disk: CSV and JSON reports and their plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import matplotlib
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from finetune.base.errors import writing


def val_fields(task) -> tuple[str, ...]:
    """val_loss and the task's metrics (single-label: val_acc; multilabel: val_map, val_f1_macro ...)."""
    return tuple(f"val_{m}" for m in ("loss", *task.metrics))


def metric_fields(task, ema: bool) -> tuple[str, ...]:
    """metrics.csv's columns; with a weight average (ema_half_life) val_* score the average and live_val_*
    the live model."""
    live = tuple(f"live_{f}" for f in val_fields(task)) if ema else ()
    return ("epoch", "train_loss", f"train_{task.train_metric}", *val_fields(task), "seconds", "images_per_s", *live)


def eval_fields(task, ema: bool) -> tuple[str, ...]:
    """evals.csv's columns (eval_every): every evaluation, mid-epoch ones and the epoch ends'."""
    return ("step", "epoch", *val_fields(task), *(tuple(f"live_{f}" for f in val_fields(task)) if ema else ()))


def subplots(*args, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, on a figure no backend knows of: it draws to a file
    with savefig and leaves pyplot's backend (a notebook's, say) and its figure list alone."""
    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", None))
    return fig, fig.subplots(*args, **kwargs)


def fonts_checked(plot):
    """A plot function (its first argument: the file it writes) whose matplotlib warnings for characters
    the font lacks (class names in another script), one per character, become one log line."""
    import functools
    import logging
    import warnings

    @functools.wraps(plot)
    def wrapper(path, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = plot(path, *args, **kwargs)
        missing = [w for w in caught if "missing from font" in str(w.message)]
        for w in caught:
            if w not in missing:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if missing:
            logging.getLogger("finetune").warning(
                "%s: %d character(s) are not in matplotlib's font and show as boxes (e.g. %s)", Path(path).name,
                len({str(w.message) for w in missing}), str(missing[0].message).split(" missing", 1)[0])
        return result

    return wrapper


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    with writing(path), open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, obj) -> None:
    with writing(path):
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def lr_curves(trace: Sequence[dict], group_names: Sequence[str]) -> list[tuple[str, list[dict]]]:
    """(legend label, rows) per distinct curve: groups whose LRs and freeze states are the same at every
    step share one line and one entry (lp_ft's body: nine groups at lr / 50), named by the first and last."""
    curves: dict[tuple, list[str]] = {}
    for name in group_names:
        rows = [r for r in trace if r["group"] == name]
        if rows:
            curves.setdefault(tuple((r["step"], r["lr"], r["trainable"]) for r in rows), []).append(name)
    return [(names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} groups)",
             [r for r in trace if r["group"] == names[0]]) for names in curves.values()]


@fonts_checked
def plot_lr_trace(path: Path, trace: Sequence[dict], group_names: Sequence[str], steps_per_epoch: int) -> None:
    """Every group's LR against the step (log scale), frozen stretches dotted, freeze changes marked."""

    fig, ax = subplots(figsize=(9, 4.5))
    changes = set()
    curves = lr_curves(trace, group_names)
    for label, rows in curves:
        steps = [r["step"] for r in rows]
        lrs = [r["lr"] for r in rows]
        line, = ax.plot(steps, [lr if r["trainable"] else None for lr, r in zip(lrs, rows)], label=label)
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
    ax.legend(fontsize=7, ncol=1 + len(curves) // 6, loc="lower left")
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2)


@fonts_checked
def plot_confusion(path: Path, matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> None:
    """The confusion matrix, rows normalised to the true class (counts written in the cells)."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(14, max(5.0, 2.5 + 0.55 * k))
    fig, ax = subplots(figsize=(side, side * 0.9))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix\n(colour: share of the true class)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)


@fonts_checked
def plot_images(path: Path, files: Sequence[str], captions: Sequence[str], columns: int = 4) -> None:
    """A contact sheet of image files with a caption under each."""
    from PIL import Image

    rows = -(-len(files) // columns)
    fig, axes = subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, caption in zip(axes.flat, files, captions):
        with Image.open(file) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=90)


@fonts_checked
def plot_lr_find(path: Path, result: dict) -> None:
    """The LR finder's smoothed loss (raw loss faint) against the swept LR, suggestions marked."""

    fig, ax = subplots(figsize=(7, 4.2))
    ax.plot(result["lrs"], result["losses"], color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="tab:blue", label="smoothed loss")
    for key, colour in (("valley", "tab:red"), ("steepest", "tab:orange")):
        lr = result[key]
        i = result["lrs"].index(lr)
        ax.plot([lr], [result["smoothed"][i]], "o", color=colour, label=f"{key} {lr:.2g}")
    ax.set_xscale("log")
    low = min(result["smoothed"])
    ax.set_ylim(top=max(result["smoothed"][0], low) * 1.3 + 1e-9, bottom=low - 0.1 * abs(low))
    swept = "every group at its ratio to the head" if result["swept"] == "all" else f"group {result['swept']}"
    ax.set_xlabel("learning rate (head)" if result["swept"] == "all" else f"learning rate ({result['swept']})")
    ax.set_ylabel("train loss")
    ax.set_title(f"LR range test: {swept}; suggestion {result['override']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)


def _freeze_changes(rows: Sequence[dict]) -> list[int]:
    """Steps at which some group's trainable flag differs from the row before."""
    last, changes = {}, []
    for r in rows:
        if r["group"] in last and last[r["group"]] != r["trainable"] and (not changes or changes[-1] != r["step"]):
            changes.append(r["step"])
        last[r["group"]] = r["trainable"]
    return changes


@fonts_checked
def plot_diagnostics(path: Path, rows: Sequence[dict], group_names: Sequence[str]) -> None:
    """Per group against the step: gradient norm, weight norm and update/weight ratio (log scales;
    dotted while frozen), freeze changes marked, the usual band of update ratios shaded."""

    fig, axes = subplots(3, 1, figsize=(9, 9), sharex=True)
    keys = (("grad_norm", "gradient norm"), ("weight_norm", "weight norm"), ("update_ratio", "||dW|| / ||W||"))
    colours = matplotlib.colormaps["viridis"]
    for gi, name in enumerate(group_names):
        mine = [r for r in rows if r["group"] == name]
        colour = colours(gi / max(1, len(group_names) - 1))
        for ax, (key, _) in zip(axes, keys):
            steps = [r["step"] for r in mine]
            on = [r[key] if r["trainable"] and r[key] > 0 else None for r in mine]
            off = [r[key] if not r["trainable"] and r[key] > 0 else None for r in mine]
            ax.plot(steps, on, color=colour, label=name if key == "grad_norm" else None, linewidth=1.2)
            if key == "weight_norm":
                ax.plot(steps, off, color=colour, linestyle=":", linewidth=1)
    for ax, (_, label) in zip(axes, keys):
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        for step in _freeze_changes(rows):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    axes[2].axhspan(1e-4, 1e-2, color="green", alpha=0.07)
    axes[2].axhline(1e-3, color="green", linewidth=0.8, alpha=0.5)
    axes[0].legend(fontsize=7, ncol=3, loc="best")
    axes[0].set_title("per-group diagnostics (dashed: freeze changes; green: the usual update ratios)")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)


@fonts_checked
def plot_activations(path: Path, rows: Sequence[dict], group_names: Sequence[str], bins: int,
                     log10_range: tuple[float, float]) -> None:
    """The "colourful dimension" plot per group: diagnostic steps on x, log10 |activation| on y, the
    share of activations in each bin as colour."""
    import numpy as np

    present = [n for n in group_names if any(r["group"] == n for r in rows)]
    if not present:
        return
    fig, axes = subplots(len(present), 1, figsize=(9, 1.6 * len(present) + 0.8), sharex=True, squeeze=False,
                         layout="constrained")  # room for the colour bar
    for ax, name in zip(axes[:, 0], present):
        mine = [r for r in rows if r["group"] == name]
        hist = np.array([[r[f"b{i}"] for i in range(bins)] for r in mine], dtype=float)
        hist = hist / np.maximum(hist.sum(1, keepdims=True), 1)
        steps = [r["step"] for r in mine]
        # a log colour scale: the tails of the distribution (1e-3 of the activations) stay visible
        image = ax.imshow(np.where(hist.T > 0, hist.T, np.nan), aspect="auto", origin="lower", cmap="magma",
                          interpolation="nearest", norm=LogNorm(vmin=1e-3, vmax=1),
                          extent=(-0.5, len(steps) - 0.5, *log10_range))
        ax.set_ylabel(name, fontsize=8)
        ticks = np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    axes[0, 0].set_title("activations per group: log10 |a| (y) at each diagnostic step (x), share as colour")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, label="share of the group's activations")
    with writing(path):
        fig.savefig(path, dpi=100)
