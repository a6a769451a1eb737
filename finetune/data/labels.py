"""data=csv: images listed in label files (CSV or TSV, as labelling tools export them), one row per image.

    finetune train data=csv data.train=labels_train.csv data.val=labels_val.csv

A file has a header; `data.image_column` (image) holds each image's path, relative to the file (or
absolute); the labels are either `data.label_column` (labels), several separated by spaces (the fastai /
Planet convention: `dog person`), or one 0/1 column per label (`data.label_columns=[dog,person]`). A row
with several labels makes the task multi-label (task=auto). With only data.train, a seeded split holds
out data.val_fraction of it, stratified by class (multi-label: by each image's rarest label). A bad row
(a missing image, a label val has and train does not, no label in a single-label task) is named with its
file and line.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import torch

from finetune.base.errors import UserError
from finetune.data.images import CheckedImageFolder

SPLIT_SEED = 0  # the held-out split is the same in every run, whatever the training seed


class LabelledImages(CheckedImageFolder):
    """(PIL image, label) of a label file's rows: a class index, or for multi-label a 0/1 float vector."""

    def __init__(self, samples, skip_bad: bool, multilabel: bool):
        super().__init__(samples, skip_bad)
        self.multilabel = multilabel


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_rows(path: Path, cfg) -> list[tuple[int, str, list[str]]]:
    """(line number, image path, labels) of every data row of the file."""
    if not path.is_file():
        raise UserError(f"data: label file {path} does not exist")
    image_col, label_col, columns = str(cfg.image_column), str(cfg.label_column), cfg.label_columns
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f, delimiter=_delimiter(path))
        header = reader.fieldnames or []
        needed = [image_col, *(list(columns) if columns else [label_col])]
        missing = [c for c in needed if c not in header]
        if missing:
            raise UserError(f"data: {path} has no column {', '.join(repr(c) for c in missing)} (its columns: "
                            f"{', '.join(header)}); set data.image_column / data.label_column / data.label_columns")
        rows = []
        for row in reader:
            line = reader.line_num
            image = (row.get(image_col) or "").strip()
            if not image:
                raise UserError(f"data: {path}:{line}: no image in column '{image_col}'")
            if columns:
                flags = [(c, (row.get(c) or "").strip()) for c in columns]
                bad = [(c, v) for c, v in flags if v not in ("0", "1", "0.0", "1.0")]
                if bad:
                    raise UserError(f"data: {path}:{line}: column '{bad[0][0]}' holds '{bad[0][1]}', not 0 or 1")
                labels = [c for c, v in flags if float(v) == 1]
            else:
                labels = (row.get(label_col) or "").split()
            rows.append((line, image, labels))
    if not rows:
        raise UserError(f"data: {path} lists no image")
    return rows


def _resolve(path: Path, rows, skip_bad: bool) -> list[tuple[int, str, list[str]]]:
    """Image paths made absolute (relative ones are relative to the label file); a missing image is named
    with its line, or with data.skip_bad left out."""
    out, base = [], path.parent
    for line, image, labels in rows:
        full = Path(os.path.expanduser(image))
        full = full if full.is_absolute() else base / full
        if not full.is_file():
            if skip_bad:
                continue
            raise UserError(f"data: {path}:{line}: image {image} does not exist ({full}); fix the row or set "
                            "data.skip_bad=true")
        out.append((line, str(full), labels))
    return out


def _is_multilabel(task_kind: str, label_columns, rows) -> bool:
    if task_kind == "multilabel":
        return True
    several = next(((line, labels) for line, _, labels in rows if len(labels) > 1), None)
    if task_kind == "single_label":
        if several:
            raise UserError(f"data: line {several[0]} gives an image {len(several[1])} labels ({' '.join(several[1])}) "
                            "but task=single_label: use task=multilabel (or task=auto)")
        return False
    return bool(several) or bool(label_columns)


def _check_single(path: Path, rows) -> None:
    empty = next((line for line, _, labels in rows if not labels), None)
    if empty is not None:
        raise UserError(f"data: {path}:{empty}: no label; a single-label task needs one per image (task=multilabel "
                        "allows images without labels)")


def held_out(rows, fraction: float, multilabel: bool) -> tuple[list, list]:
    """(train rows, val rows): `fraction` of each stratum (a class; multi-label: each image's rarest label)
    held out, seeded, at least one image of each stratum kept for training."""
    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1) to hold out a val split, got {fraction}")
    counts = Counter(label for _, _, labels in rows for label in labels)
    strata: dict[str, list] = {}
    for row in rows:
        key = min(row[2], key=lambda label: (counts[label], label)) if row[2] else ""
        strata.setdefault(key, []).append(row)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, val = [], []
    for key in sorted(strata):
        members = strata[key]
        order = torch.randperm(len(members), generator=g).tolist()
        k = min(len(members) - 1, round(fraction * len(members)))
        val += [members[i] for i in order[:k]]
        train += [members[i] for i in order[k:]]
    return sorted(train), sorted(val)


def classes(cfg) -> list[str]:
    """The label names (the head's outputs): data.label_columns, or the labels the train file names, sorted."""
    if cfg.label_columns:
        return list(cfg.label_columns)
    if not cfg.train:
        raise UserError("data.train is required for data=csv: a label file (CSV or TSV) with an image and a labels "
                        "column")
    rows = read_rows(Path(os.path.expanduser(str(cfg.train))).absolute(), cfg)
    return sorted({x for _, _, labels in rows for x in labels})


def splits(cfg, task_kind: str = "auto"):
    """(train, val, class names, images skipped) of data=csv."""
    if not cfg.train:
        raise UserError("data.train is required for data=csv: a label file (CSV or TSV) with an image and a labels "
                        "column")
    train_path = Path(os.path.expanduser(str(cfg.train))).absolute()
    skip_bad = bool(cfg.skip_bad)
    read = read_rows(train_path, cfg)
    train_rows = _resolve(train_path, read, skip_bad)
    val_path = Path(os.path.expanduser(str(cfg.val))).absolute() if cfg.val else None
    val_read = read_rows(val_path, cfg) if val_path else []
    val_rows = _resolve(val_path, val_read, skip_bad) if val_path else []
    skipped = len(read) - len(train_rows) + len(val_read) - len(val_rows)
    multilabel = _is_multilabel(str(task_kind), cfg.label_columns, train_rows + val_rows)
    if not multilabel:
        _check_single(train_path, train_rows)
        if val_path:
            _check_single(val_path, val_rows)
    classes = list(cfg.label_columns) if cfg.label_columns else sorted({x for _, _, labels in train_rows for x in labels})
    if val_path:
        known = set(classes)
        unknown = next(((line, x) for line, _, labels in val_rows for x in labels if x not in known), None)
        if unknown:
            raise UserError(f"data: {val_path}:{unknown[0]}: label '{unknown[1]}' is not in {train_path.name}'s labels; "
                            "a model cannot learn a label it never sees in training")
    else:
        train_rows, val_rows = held_out(train_rows, float(cfg.val_fraction), multilabel)
    index = {name: i for i, name in enumerate(classes)}

    def samples(rows):
        if multilabel:
            out = []
            for _, image, labels in rows:
                target = torch.zeros(len(classes))
                target[[index[x] for x in labels]] = 1.0
                out.append((image, target))
            return out
        return [(image, index[labels[0]]) for _, image, labels in rows]

    return (LabelledImages(samples(train_rows), skip_bad, multilabel),
            LabelledImages(samples(val_rows), skip_bad, multilabel), classes, skipped)
