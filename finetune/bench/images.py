"""The ImageFolders the benchmark trains on, besides a dataset as it is: the embedded digits written out,
a seeded choice of N train images per class (the few-shot regime), and cross-validation folds of train/
(the images a recipe may be tuned on). Derived folders hold symlinks to the source's files."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

FOLD_SEED = 123  # the folds of the README's tuning runs


def make_digits(out: Path, train_per_class: int = 30, val_per_class: int = 50, size: int = 32) -> None:
    """The embedded digits (finetune/assets: 1797 8x8 images, 10 classes) as an ImageFolder of `size` px
    PNGs: the same fixed per-class split as `data=digits` (train_per_class / val_per_class images)."""
    from finetune.data.datasets import digits_split

    for split in ("train", "val"):
        for i, (image, digit) in enumerate(digits_split(split, train_per_class, val_per_class, size)):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
    print(f"wrote {out} ({train_per_class}/{val_per_class} train/val images per class)")


def count_images(root: Path) -> tuple[int, int]:
    """(train, val) image counts of an ImageFolder."""
    return tuple(sum(1 for p in (root / split).rglob("*") if p.is_file()) for split in ("train", "val"))


def fold_of(files: list[str], k: int, seed: int = FOLD_SEED) -> dict[str, int]:
    """{file: fold} for one class: a seeded shuffle dealt round-robin into k folds (sizes differ by <= 1)."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    return {f: i % k for i, f in enumerate(order)}


def train_subset(data: Path, per_class: int, out: Path) -> Path:
    """--train-per-class's ImageFolder of `data`, in the benchmark folder `out`."""
    return subset(data, per_class, out / f"data_{per_class}_per_class")


def subset(data: Path, per_class: int, out: Path, seed: int = FOLD_SEED) -> Path:
    """An ImageFolder at `out` with `per_class` train images of each class of `data` (the first of a
    seeded shuffle: the same files for every recipe, seed and rerun) and `data`'s val/ as it is."""
    source = data / "train"
    for cls in sorted(p.name for p in source.iterdir() if p.is_dir()):
        files = sorted(p.name for p in (source / cls).iterdir() if p.is_file())
        if len(files) < per_class:
            raise SystemExit(f"--train-per-class {per_class}: class {cls} has only {len(files)} train images")
        random_order = files[:]
        random.Random(seed).shuffle(random_order)
        folder = out / "train" / cls
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in random_order[:per_class]:
            (folder / name).symlink_to((source / cls / name).resolve())
    val = out / "val"
    if not val.exists():
        val.symlink_to((data / "val").resolve())
    return out


def make_folds(data: Path, out: Path, k: int, seed: int = FOLD_SEED) -> None:
    """K-fold cross-validation of `data`/train as K ImageFolders out/fold<i>/{train,val} (symlinks),
    stratified per class: tune on these, never on `data`/val."""
    if k < 2:
        raise SystemExit(f"--make-folds needs at least 2 folds, got {k}")
    source = data / "train"
    if not source.is_dir():
        raise SystemExit(f"--data {data}: no train/ folder to split")
    for cls in sorted(p.name for p in source.iterdir() if p.is_dir()):
        folds = fold_of([p.name for p in (source / cls).iterdir() if p.is_file()], k, seed)
        for i in range(k):
            for split in ("train", "val"):
                (out / f"fold{i}" / split / cls).mkdir(parents=True, exist_ok=True)
            for name, fold in folds.items():
                link = out / f"fold{i}" / ("val" if fold == i else "train") / cls / name
                if not link.exists():
                    link.symlink_to((source / cls / name).resolve())
    print(f"wrote {k} folds of {source} to {out}/fold0..fold{k - 1}")
