"""`finetune eval ckpt=RUN_DIR_OR_FILE [split=val] [data.root=...] [tta=true]`: a trained model scored on a
split by its task (finetune/tasks/): single-label, loss, accuracy, top-5 (more than 5 classes), per-class
precision, recall and F1 and the confusion matrix (CSV and PNG); multilabel, loss, mAP, macro and micro F1
at the run's thresholds and per label its AP, F1, precision and recall; and the images it gets most wrong
(CSV and a contact sheet).

The split is the run's own data (`split=val` or `train`, with the eval transform) or, for an ImageFolder,
any folder ROOT/<split>/<class>/ (a held-out test/ set): its class folders are matched to the model's
classes by name, so a test set may hold fewer classes.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import MISSING, OmegaConf
from torch.utils.data import DataLoader, Dataset

from finetune.base.errors import UserError, writing
from finetune.commands.saved import SavedModel, load, parse_args
from finetune.data import datasets, transforms
from finetune.data import loaders as data_mod
from finetune.output import report
from finetune.output.progress import bar

log = logging.getLogger("finetune")


@dataclass
class EvalArgs:
    ckpt: str = MISSING  # run directory or checkpoint file
    split: str = "val"  # val | train | any folder name under an ImageFolder's root (test, ...)
    batch_size: int = 64
    device: str = "auto"
    tta: bool = False  # also score the horizontally flipped image; average the probabilities
    top_losses: int = 16  # the images with the highest loss, listed and drawn
    average: bool = True  # the run's weight average when it kept one
    out: Optional[str] = None  # default: RUN_DIR/eval/<split>
    num_workers: int = -1
    data: Dict[str, Any] = field(default_factory=dict)  # data.* overrides of the run's data config


@dataclass
class Scored:
    """Per image: its path (or index), true label (multilabel: its 0/1 vector) and predicted probabilities."""
    names: list[str]
    targets: torch.Tensor  # (N,), multilabel (N, C)
    probs: torch.Tensor  # (N, C)


class _Named(Dataset):
    """(image tensor, label, name) from a base (image, label) dataset and each sample's name."""
    def __init__(self, base: Dataset, names: list[str], transform):
        self.base, self.names, self.transform = base, names, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if not isinstance(image, torch.Tensor) and getattr(image, "mode", "RGB") != "RGB":
            image = transforms.to_rgb(image)
        return self.transform(image), label if isinstance(label, torch.Tensor) and label.dim() else int(label), i


def scored_root(saved: SavedModel, args) -> str | None:
    """The absolute data.root the images are read from (None: data that has no root)."""
    root = args.data.get("root") or saved.config["data"].get("root")
    return os.path.abspath(os.path.expanduser(str(root))) if root else None


def split_dataset(saved: SavedModel, args) -> tuple[Dataset, list[str]]:
    """The images to score and their names, labelled in the model's class order."""
    data_cfg = OmegaConf.merge(OmegaConf.create(saved.config["data"]), OmegaConf.create(dict(args.data)))
    transform = transforms.eval_transform(saved.preprocess.input_size, saved.preprocess)
    if data_cfg.name == "imagefolder":
        root = datasets.imagefolder_root(data_cfg)
        split_dir = os.path.join(root, args.split)
        if not os.path.isdir(split_dir):
            raise UserError(f"eval: no folder '{split_dir}' (split={args.split} under data.root={root})")
        folders = datasets.class_dirs(split_dir)
        unknown = sorted(set(folders) - set(saved.classes))
        if unknown:
            raise UserError(f"eval: {split_dir} has class folders the model does not know: {unknown}; its "
                            f"classes are {saved.classes}")
        files = datasets.scan_split(split_dir, folders)
        samples = [(p, saved.classes.index(c)) for c in folders for p in files[c]]
        if not samples:
            raise UserError(f"eval: no images under {split_dir}")
        return _Named(datasets.CheckedImageFolder(samples, bool(data_cfg.skip_bad)), [p for p, _ in samples],
                      transform), folders
    if args.split not in ("train", "val"):
        raise UserError(f"eval: split={args.split}: data={data_cfg.name} has the splits train and val")
    bundle = data_mod.build_data(data_cfg, saved.preprocess, batch_size=1, seed=0, task_kind=saved.task.name)
    if list(bundle.classes) != saved.classes:
        raise UserError(f"eval: the data's classes {bundle.classes} are not the model's {saved.classes}")
    base = (bundle.val if args.split == "val" else bundle.train).base
    return _Named(base, [f"{args.split}[{i}]" for i in range(len(base))], transform), saved.classes


@torch.no_grad()
def score(saved: SavedModel, dataset: Dataset, batch_size: int, tta: bool = False, num_workers: int = -1,
          progress: bool = True) -> Scored:
    """The task's probabilities of every image (with `tta`: the mean over the image and its mirror)."""
    in_memory = not isinstance(getattr(dataset, "base", None), datasets.CheckedImageFolder)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=data_mod.resolve_workers(num_workers, in_memory))
    probs, targets, names = [], [], []
    with bar(len(loader), "scoring", enabled=progress) as advance:
        for x, y, index in loader:
            probs.append(saved.probabilities(x, tta).cpu())
            targets.append(y)
            names += [dataset.names[int(i)] for i in index]
            advance()
    return Scored(names, torch.cat(targets), torch.cat(probs))


def write_reports(out: Path, result: dict, scored: Scored, saved: SavedModel, top: int) -> None:
    """metrics.json, the per-class (per-label) CSV, the confusion matrix (single-label) and the images with
    the highest loss, listed and drawn."""
    classes, task = saved.classes, saved.task
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "metrics.json", result)
    losses = task.per_image_loss(scored.probs, scored.targets)
    worst = torch.argsort(losses, descending=True)[:top].tolist()
    if task.name == "multilabel":
        report.write_csv(out / "per_label.csv", result["per_label"],
                         ("label", "ap", "f1", "precision", "recall", "support", "threshold"))
        chosen = task.predict(scored.probs)

        def names(row) -> str:
            return " ".join(c for c, on in zip(classes, row.tolist()) if on)

        rows = [{"image": scored.names[i], "true": names(scored.targets[i].bool()), "predicted": names(chosen[i]),
                 "loss": round(float(losses[i]), 5)} for i in worst]
        report.write_csv(out / "top_losses.csv", rows, ("image", "true", "predicted", "loss"))
    else:
        report.write_csv(out / "per_class.csv", result["per_class"], ("class", "precision", "recall", "f1", "support"))
        with writing(out / "confusion_matrix.csv"), open(out / "confusion_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *classes])
            w.writerows([c, *row] for c, row in zip(classes, result["confusion_matrix"]))
        report.plot_confusion(out / "confusion_matrix.png", result["confusion_matrix"], classes)
        predicted = task.predict(scored.probs)
        rows = [{"image": scored.names[i], "true": classes[int(scored.targets[i])],
                 "predicted": classes[int(predicted[i])], "loss": round(float(losses[i]), 5),
                 "p_true": round(float(scored.probs[i, scored.targets[i]]), 5)} for i in worst]
        report.write_csv(out / "top_losses.csv", rows, ("image", "true", "predicted", "loss", "p_true"))
    files = [r for r in rows if os.path.isfile(r["image"])]
    if files:
        report.plot_images(out / "top_losses.png", [r["image"] for r in files],
                           [f"{r['true']} -> {r['predicted']}\nloss {r['loss']:.2f}" for r in files])


def run(argv: list[str]) -> dict:
    args = parse_args(EvalArgs, argv, "eval")
    if args.batch_size < 1 or args.top_losses < 0:
        raise UserError("eval: batch_size must be >= 1 and top_losses >= 0")
    saved = load(args.ckpt, args.device, args.average)
    dataset, present = split_dataset(saved, args)
    scored = score(saved, dataset, args.batch_size, args.tta, args.num_workers)
    result = {"checkpoint": str(saved.path), "data_root": scored_root(saved, args), "split": args.split,
              "tta": bool(args.tta),
              "weights": "average" if saved.averaged else "live", "task": saved.task.state(),
              **saved.task.report(scored.probs, scored.targets, saved.classes)}
    root = args.data.get("root")
    default = saved.run_dir / "eval" / (f"{Path(str(root)).name}_{args.split}" if root else args.split)
    out = Path(args.out) if args.out else default
    write_reports(out, result, scored, saved, args.top_losses)
    _print(result, out)
    return result


def _print(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if "per_label" in result:  # multilabel
        title = (f"{result['split']}: {result['images']} images, loss {result['loss']:.4f}, mAP {result['map']:.4f}, "
                 f"F1 macro {result['f1_macro']:.4f}, micro {result['f1_micro']:.4f}")
        columns, rows, key = ("label", "ap", "f1", "precision", "recall", "support", "threshold"), result["per_label"], "label"
    else:
        title = (f"{result['split']}: {result['images']} images, loss {result['loss']:.4f}, accuracy "
                 f"{result['accuracy']:.4f}" + (f", top-5 {result['top5_accuracy']:.4f}" if "top5_accuracy" in result
                                                else ""))
        columns, rows, key = ("class", "precision", "recall", "f1", "support"), result["per_class"], "class"
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == key else "right")
    for row in rows:
        table.add_row(row[key], *("" if row[m] is None else str(row[m]) if m == "support" else f"{row[m]:.3f}"
                                  for m in columns[1:]))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"reports in {out}", highlight=False)
