"""The skewed-classes benchmark (scripts/bench_skew.py): a single-label set made skewed (train classes from
`largest` images down to a tenth of it, geometrically; val balanced and whole), trained under plain
cross-entropy, balanced class weights, the balanced sampler, logit adjustment and the default (auto, which
measures whether to weight), several seeds each; balanced accuracy and macro F1 of the last epoch."""

from __future__ import annotations

import csv
from pathlib import Path

from finetune.bench.results import mean_se, resumable_runs, train_on_label_files

# the methods, as the settings each adds to the same command line (lp_ft: what auto trains on near data)
METHODS = {
    "plain CE": ["experiment=lp_ft"],
    "class weights": ["experiment=lp_ft", "loss.class_weights=balanced"],
    "balanced sampler": ["experiment=lp_ft", "data.sampler=balanced"],
    "logit adjustment": ["experiment=lp_ft", "loss.logit_adjust=1"],
    "default (auto)": [],
}


def skewed_counts(classes: int, largest: int, ratio: float = 10.0) -> list[int]:
    """Train images per class: `largest` down to largest / ratio, geometrically."""
    return [max(1, round(largest * ratio ** (-i / max(1, classes - 1)))) for i in range(classes)]


def write_label_files(root: Path, out: Path, largest: int, ratio: float = 10.0) -> dict:
    """out/train.csv (the skewed train set, the first files of each class folder in sorted order) and
    out/val.csv (every val image), for data=csv; returns the counts."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    counts = skewed_counts(len(classes), largest, ratio)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", counts), ("val", None)):
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "labels"])
            for c, name in enumerate(classes):
                files = sorted(p for p in (root / split / name).iterdir() if p.is_file())
                for path in files[: per_class[c]] if per_class else files:
                    writer.writerow([str(path.resolve()), name])
    return {"classes": classes, "train_counts": counts}


def run_one(files: Path, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One training run in this process: the last epoch's balanced accuracy, macro F1 and accuracy."""
    summary, seconds = train_on_label_files(files, [*METHODS[method], *extra], seed, out)
    auto = (summary.get("recipe") or {}).get("auto") or {}
    return {"method": method, "seed": seed, "bal_acc": summary["final_val_bal_acc"],
            "f1_macro": summary["final_val_f1_macro"], "acc": summary["final_val_acc"],
            "recipe": summary["recipe"]["name"] if summary.get("recipe") else "none",
            "auto_set": auto.get("set"), "seconds": seconds}


def table(rows: list[dict]) -> tuple[str, dict]:
    """A markdown table (mean +- standard error over seeds) and the goals' verdicts."""
    stats = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            stats[method] = {k: mean_se([r[k] for r in mine]) for k in ("bal_acc", "f1_macro", "acc")}
    lines = ["| method | balanced accuracy | macro F1 | accuracy | seeds |", "|---|---|---|---|---|"]
    for method, s in stats.items():
        n = sum(r["method"] == method for r in rows)
        lines.append(f"| {method} | " + " | ".join(f"{s[k][0]:.3f} +- {s[k][1]:.3f}" for k in ("bal_acc", "f1_macro",
                                                                                               "acc")) + f" | {n} |")
    verdict = {}
    if "default (auto)" in stats and "plain CE" in stats:
        best = max(stats, key=lambda m: stats[m]["bal_acc"][0])
        d, b, p = stats["default (auto)"]["bal_acc"], stats[best]["bal_acc"], stats["plain CE"]["bal_acc"]
        verdict = {"best": best, "default_within_one_se_of_best": b[0] - d[0] <= max(b[1], d[1]),
                   "default_minus_plain_bal_acc": round(d[0] - p[0], 4),
                   "default_at_least_plain_plus_0.03": d[0] - p[0] >= 0.03}
    return "\n".join(lines), verdict


def run(root: Path, out: Path, largest: int, seeds: list[int], methods: list[str], extra: list[str]) -> dict:
    """Every method x seed (results appended to out/results.jsonl as they land, kept on a rerun)."""
    files = out / "labels"
    counts = write_label_files(root, files, largest)
    rows = resumable_runs(out / "results.jsonl", seeds, methods,
                          lambda method, seed: run_one(files, method, seed, out / "runs" / f"{method.split()[0]}_{seed}",
                                                       extra))
    text, verdict = table(rows)
    return {"counts": counts, "rows": rows, "table": text, "verdict": verdict}
