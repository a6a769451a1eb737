"""The image sources behind `data.name`, untransformed (loaders and transforms: finetune/data/loaders.py).

Four of them: `digits` (the embedded default, real handwritten digits), `synthetic` (an offline, generated
classification task), `imagefolder` (ROOT/train and ROOT/val, one folder per class) and torchvision
datasets by name (cifar10, ...); a `_target_` builds a custom one (finetune/data/targets.py); tar shards
(`webdataset`, finetune/data/shards.py) and Hugging Face datasets (`hf`, finetune/data/hf.py) hold more.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from finetune.base.errors import UserError
from finetune.data import hf, labels, shards, targets
from finetune.data.images import CheckedImageFolder

log = logging.getLogger(__name__)

# Check every image's header up front only below this many files; beyond, bad files surface at load time.
VERIFY_MAX_FILES = 50_000
# Fixed seed of the synthetic data set: independent of the training seed, so every run sees the same data.
SYNTHETIC_SEED = 20240611
DEFAULT_ROOT = "~/.cache/finetune/data"
# torchvision's ImageFolder extensions plus .gif, which PIL reads (first frame) and real folders contain
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# torchvision datasets by name: (class name in torchvision.datasets, number of classes, split keyword style).
# "train" style takes train=True/False; "split" style takes split="train"/"test".
TORCHVISION_DATASETS: dict[str, tuple[str, int, str]] = {
    "cifar10": ("CIFAR10", 10, "train"),
    "cifar100": ("CIFAR100", 100, "train"),
    "mnist": ("MNIST", 10, "train"),
    "fashion_mnist": ("FashionMNIST", 10, "train"),
    "kmnist": ("KMNIST", 10, "train"),
    "svhn": ("SVHN", 10, "split"),
    "stl10": ("STL10", 10, "split"),
}


# --------------------------------------------------------------------------------------------- names


def dataset_name(cfg) -> str:
    if getattr(cfg, "_target_", None):
        return "custom"
    return str(cfg.name).strip().lower().replace("-", "_")


BUILT_IN = ("digits", "synthetic", "imagefolder", "webdataset", "hf", "csv", "custom")


def check_name(name: str) -> None:
    if name not in BUILT_IN and name not in TORCHVISION_DATASETS:
        known = ", ".join([*BUILT_IN, *TORCHVISION_DATASETS])
        raise UserError(f"unknown data.name '{name}'; choose one of: {known}.")


def num_classes(cfg) -> int:
    """The number of classes, without loading any images (the model head is built from it)."""
    name = dataset_name(cfg)
    check_name(name)
    if name == "synthetic":
        _check_synthetic(cfg)
        return int(cfg.num_classes)
    if name == "imagefolder":
        return len(_imagefolder_classes(imagefolder_root(cfg)))
    if name == "digits":
        return len(DIGIT_CLASSES)
    if name == "webdataset":  # the index.json beside the shards (finetune/data/shards.py)
        return len(shards.classes(cfg))
    if name == "hf":  # the label column's ClassLabel (finetune/data/hf.py)
        return len(hf.classes(cfg))
    if name == "csv":  # the labels the train file names (finetune/data/labels.py)
        return len(labels.classes(cfg))
    if name == "custom":
        return targets.num_classes(cfg)
    return TORCHVISION_DATASETS[name][1]


# datasets held in memory: DataLoader workers would cost more to start than they save
IN_MEMORY = ("synthetic", "digits")


def splits(cfg, size: int, task_kind: str = "auto") -> tuple[Dataset, Dataset, list[str], int]:
    """(train, val, class names, unreadable images skipped) of `cfg` (a DataConfig), untransformed;
    `size` is the input size, which the synthetic images are generated at; `task_kind` (task.kind) tells
    a label file whether an image without labels is an error."""
    name = dataset_name(cfg)
    check_name(name)
    if name == "synthetic":
        return (*_synthetic_splits(cfg, size), 0)
    if name == "digits":
        train, val = (_ImageList(digits_split(split)) for split in ("train", "val"))
        return train, val, DIGIT_CLASSES, 0
    if name == "imagefolder":
        return _imagefolder_splits(cfg)
    if name == "webdataset":
        return (*shards.splits(cfg), 0)
    if name == "hf":
        return (*hf.splits(cfg), 0)
    if name == "csv":
        return labels.splits(cfg, task_kind)
    if name == "custom":
        return (*targets.build_splits(cfg), 0)
    return (*_torchvision_splits(cfg, name), 0)


# --------------------------------------------------------------------------------------------- digits

# the embedded real images (finetune/assets/README.md): handwritten digits, far from ImageNet photos
DIGITS_FILE = Path(__file__).resolve().parents[1] / "assets" / "digits.npz"
DIGIT_CLASSES = [str(d) for d in range(10)]
DIGITS_PER_CLASS = {"train": 30, "val": 50}
DIGITS_STORED_PX = 32  # upscaled once like the benchmark's PNG folders, before the model's transform


def digits_split(split: str, train_per_class: int = DIGITS_PER_CLASS["train"],
                 val_per_class: int = DIGITS_PER_CLASS["val"], size: int = DIGITS_STORED_PX):
    """[(grey PIL image of `size` px, label)] of one split: per digit, a fixed permutation (seed 0) gives
    the first `train_per_class` images to train and the next `val_per_class` to val."""
    with np.load(DIGITS_FILE) as stored:
        pixels, labels = stored["images"], stored["labels"].astype(int)
    rng = np.random.default_rng(0)
    samples = []
    for digit in range(len(DIGIT_CLASSES)):
        order = rng.permutation(np.flatnonzero(labels == digit))
        chosen = order[:train_per_class] if split == "train" else order[train_per_class:train_per_class + val_per_class]
        for i in chosen:
            image = Image.fromarray((pixels[i] * (255 / 16)).round().astype(np.uint8), mode="L")
            samples.append((image.resize((size, size), Image.BILINEAR), digit))
    return samples


class _ImageList(Dataset):
    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


# ------------------------------------------------------------------------------------------- synthetic


def _check_synthetic(cfg) -> None:
    for key, low in (("num_classes", 2), ("train_size", 1), ("val_size", 1)):
        if int(getattr(cfg, key)) < low:
            raise UserError(f"data.{key} must be at least {low} for the synthetic data set, got {getattr(cfg, key)}.")


def _class_styles(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: stripe angle, stripe period (fraction of the image) and RGB colour, all distinct."""
    c = np.arange(k)
    angle = np.pi * ((c * 0.6180339887) % 1.0)  # golden-ratio spacing keeps angles apart for any k
    period = np.array([0.07, 0.11, 0.17])[c % 3]
    hue = (c / k + 0.05) % 1.0
    # HSV (s=0.75, v=0.95) -> RGB, vectorised
    channel = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6.0) % 6.0
    colour = 0.95 - 0.95 * 0.75 * np.clip(np.minimum(channel, 4.0 - channel), 0.0, 1.0)
    return angle, period, colour


@functools.lru_cache(maxsize=8)
def synthetic_images(n: int, k: int, size: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` uint8 images (N, 3, size, size) and balanced labels. Each class is a soft disc of oriented stripes in
    its own colour, angle and period; position, scale, phase, colour, background and noise vary per sample.
    `split` (0 train, 1 val) picks an independent random stream, so val samples are distinct from train."""
    rng = np.random.default_rng([SYNTHETIC_SEED, k, size, split])
    labels = rng.permutation(np.arange(n) % k)
    angle_c, period_c, colour_c = _class_styles(k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for start in range(0, n, 32):  # chunks bound the float temporaries (32 x 3 x 224 x 224 floats)
        lab = labels[start : start + 32]
        m = len(lab)

        def col(values):  # per-sample scalars -> broadcastable (m, 1, 1)
            return np.asarray(values, dtype=np.float32).reshape(m, 1, 1)

        angle = col(angle_c[lab] + rng.normal(0, 0.1, m))
        period = col(period_c[lab] * rng.uniform(0.85, 1.15, m))
        phase = col(rng.uniform(0, 2 * np.pi, m))
        cx, cy = col(rng.uniform(0.3, 0.7, m)), col(rng.uniform(0.3, 0.7, m))
        radius = col(rng.uniform(0.22, 0.4, m))
        proj = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * proj + phase)
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        mask = 1.0 / (1.0 + np.exp((dist - radius) * (size / 2.0)))  # ~2 px soft edge
        colour = np.clip(colour_c[lab] + rng.normal(0, 0.07, (m, 3)), 0, 1).astype(np.float32)
        background = rng.uniform(0.25, 0.75, (m, 3)).astype(np.float32)
        fg = (0.25 + 0.75 * stripes)[:, None] * colour[:, :, None, None]
        img = background[:, :, None, None] + mask[:, None] * (fg - background[:, :, None, None])
        img += (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.18  # uniform noise: 4x cheaper than normal
        out[start : start + m] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64))


class TensorImages(Dataset):
    """(uint8 CHW image tensor, label) pairs held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _synthetic_splits(cfg, size: int):
    _check_synthetic(cfg)
    k = int(cfg.num_classes)
    train = TensorImages(*synthetic_images(int(cfg.train_size), k, size, 0))
    val = TensorImages(*synthetic_images(int(cfg.val_size), k, size, 1))
    return train, val, [f"class_{i}" for i in range(k)]


# ----------------------------------------------------------------------------------------- imagefolder


def imagefolder_root(cfg) -> str:
    if cfg.root is None or str(cfg.root).strip() == "":
        raise UserError("data.root is required for data.name=imagefolder: a folder with train/ and val/ inside.")
    root = os.path.expanduser(str(cfg.root))
    if not os.path.isdir(root):
        raise UserError(f"data.root '{root}' does not exist or is not a folder.")
    return root


def class_dirs(split_dir: str) -> list[str]:
    # hidden folders (.ipynb_checkpoints, .git) are not classes
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _imagefolder_classes(root: str) -> list[str]:
    """The class names shared by ROOT/train and ROOT/val, validating the layout."""
    found = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserError(f"data.root '{root}' has no '{split}' folder; expected {root}/train and {root}/val.")
        found[split] = class_dirs(split_dir)
        if not found[split]:
            raise UserError(f"'{split_dir}' has no class folders; put each class's images in its own subfolder.")
    if found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        raise UserError(
            f"train and val in '{root}' have different classes: only in train: {only_train or 'none'}; "
            f"only in val: {only_val or 'none'}."
        )
    return found["train"]


def _readable(path: str, decode: bool = False) -> bool:
    """A cheap header check (PIL verify decodes no pixel data; truncated pixel data surfaces at load time),
    or with `decode` a full decode, which also finds truncated files (data.skip_bad counts those too)."""
    try:
        with Image.open(path) as im:
            im.load() if decode else im.verify()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for broken files
        return False


def sample_labels(dataset) -> list[int] | None:
    """Each sample's class index, read without loading an image (a folder's or a label file's listing,
    generated or embedded sets), unwrapping transformed views; None where only the images would tell
    (shards, Hugging Face datasets, your own) or for multi-label sets."""
    while not hasattr(dataset, "samples") and not hasattr(dataset, "labels") and hasattr(dataset, "base"):
        dataset = dataset.base
    if getattr(dataset, "multilabel", False):
        return None
    if hasattr(dataset, "samples") and dataset.samples and isinstance(dataset.samples[0][1], int):
        return [int(label) for _, label in dataset.samples]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.dim() == 1:
        return labels.tolist()
    return None


def files_fingerprint(dataset) -> str | None:
    """A digest of the image files behind `dataset` (path, size, modification time of each), unwrapping
    transformed views; None when its images are not files (digits, synthetic: their config defines them)."""
    while not hasattr(dataset, "samples") and hasattr(dataset, "base"):
        dataset = dataset.base
    if callable(getattr(dataset, "fingerprint", None)):  # shards, a Hugging Face split: their own digest
        return dataset.fingerprint()
    samples = getattr(dataset, "samples", None)
    if not samples or not isinstance(samples[0][0], str):
        return None
    digest = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def scan_split(split_dir: str, classes: list[str]) -> dict[str, list[str]]:
    """Image files per class, sorted, recursing into subfolders and symlinks: each real folder once (a link
    back up the tree is a loop os.walk would follow forever), each real file once. A file belongs to the
    class folder it really lives in: a link that leads into another class's folder (`ants/loop -> ..`) is
    not followed there, so no image is read under a second label. A file that lives outside every class
    folder (class folders of links to a pool of images) belongs to the class that links it, and to one
    only: linked from two classes, the split is refused. Class folders that are the same folder (one links
    to the other) are named in a warning: their images carry two labels."""
    files, real_class = {}, {}
    tops = {name: os.path.realpath(os.path.join(split_dir, name)) for name in classes}
    for name in classes:
        if tops[name] in real_class:
            log.warning("class folders '%s' and '%s' in %s are the same folder (%s): its images are labelled as both",
                        real_class[tops[name]], name, split_dir, tops[name])
        real_class.setdefault(tops[name], name)
    owner = _class_folder(list(tops.values()))
    outside: dict[str, str] = {}  # real path of a file outside every class folder -> the class that links it
    for name in classes:
        seen_dirs, seen_files, found = set(), set(), []
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name), followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs or owner(real) not in (None, tops[name]):
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                path = os.path.join(dirpath, f)
                real_file = os.path.realpath(path)
                if not f.lower().endswith(IMAGE_EXTENSIONS) or real_file in seen_files:
                    continue
                belongs = owner(real_file)
                if belongs not in (None, tops[name]):  # found there, under its own label
                    continue
                if belongs is None:
                    if outside.setdefault(real_file, name) != name:
                        raise UserError(f"image '{real_file}' is linked from class folders '{outside[real_file]}' "
                                        f"and '{name}' in {split_dir}: an image has one label; remove one link")
                seen_files.add(real_file)
                found.append(path)
        files[name] = sorted(found)
    return files


def _class_folder(tops: list[str]):
    """owner(real_path): the real class folder that holds the path (the deepest), or None for a path
    outside every class folder."""
    by_depth = sorted(set(tops), key=len, reverse=True)

    def owner(path: str) -> str | None:
        return next((top for top in by_depth if path == top or path.startswith(top.rstrip(os.sep) + os.sep)), None)

    return owner


def _drop_unreadable(files: list[str], skip_bad: bool) -> tuple[list[str], list[str]]:
    """(readable, unreadable) files by header check; an unreadable one is an error unless skip_bad."""
    good = [p for p in files if _readable(p, decode=skip_bad)]
    bad = sorted(set(files) - set(good))
    if bad and not skip_bad:
        raise UserError(
            f"cannot read image '{bad[0]}' ({len(bad)} unreadable in its folder); "
            f"fix or delete it, or set data.skip_bad=true."
        )
    return good, bad


def _imagefolder_splits(cfg):
    root = imagefolder_root(cfg)
    classes = _imagefolder_classes(root)
    scanned = {split: scan_split(os.path.join(root, split), classes) for split in ("train", "val")}
    verify = sum(len(f) for per_class in scanned.values() for f in per_class.values()) <= VERIFY_MAX_FILES
    all_bad: list[str] = []
    datasets = []
    for split in ("train", "val"):
        samples = []
        for label, name in enumerate(classes):
            files = scanned[split][name]
            if verify:
                files, bad = _drop_unreadable(files, bool(cfg.skip_bad))
                all_bad += bad
            if not files:
                raise UserError(f"class folder '{os.path.join(root, split, name)}' has no readable images.")
            samples += [(p, label) for p in files]
        datasets.append(CheckedImageFolder(samples, bool(cfg.skip_bad)))
    if all_bad:
        log.warning("skipped %d unreadable images in %s (first: %s)", len(all_bad), root, all_bad[0])
    return datasets[0], datasets[1], classes, len(all_bad)


# ---------------------------------------------------------------------------------------- torchvision


def _torchvision_splits(cfg, name: str):
    import torchvision.datasets as tvd

    cls_name, k, split_style = TORCHVISION_DATASETS[name]
    root = os.path.expanduser(str(cfg.root) if cfg.root else DEFAULT_ROOT)
    splits = []
    for train in (True, False):
        kwargs: dict[str, Any] = {"train": train} if split_style == "train" else {"split": "train" if train else "test"}
        try:
            if cfg.download:
                os.makedirs(root, exist_ok=True)
            splits.append(getattr(tvd, cls_name)(root=root, download=bool(cfg.download), **kwargs))
        except (OSError, RuntimeError) as e:  # URLError is an OSError; missing/corrupt files a RuntimeError
            how = "the download failed" if cfg.download else "data.download is false"
            raise UserError(
                f"{name} is not in '{root}' and {how} ({e}); copy torchvision's {cls_name} files there "
                f"(or set data.root to where they are) and retry."
            ) from None
    classes = list(getattr(splits[0], "classes", None) or [str(i) for i in range(k)])
    return splits[0], splits[1], classes
