"""Datasets, transforms and loaders.

Three sources, picked by `data.name`: `synthetic` (an offline, generated classification task), `imagefolder`
(ROOT/train and ROOT/val, one folder per class) and torchvision datasets by name (cifar10, ...).

Determinism: the train order and every random augmentation are a pure function of (seed, epoch, sample
index). The sampler runs in the main process and hands each worker `(index, epoch)` keys; the dataset seeds a
forked RNG from the key before augmenting. So batches do not depend on the global RNG, the number of workers
or on what ran before, which is what an exact resume needs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from finetune.errors import UserError

log = logging.getLogger(__name__)

# Random-resized-crop scale range: milder than ImageNet's (0.08, 1) because fine-tuning sets are small and
# objects often fill the frame; very small crops would mostly destroy the label.
TRAIN_CROP_SCALE = (0.35, 1.0)
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


def _dataset_name(cfg) -> str:
    if getattr(cfg, "_target_", None):
        return "custom"
    return str(cfg.name).strip().lower().replace("-", "_")


BUILT_IN = ("digits", "synthetic", "imagefolder", "custom")


def _check_name(name: str) -> None:
    if name not in BUILT_IN and name not in TORCHVISION_DATASETS:
        known = ", ".join([*BUILT_IN, *TORCHVISION_DATASETS])
        raise UserError(f"unknown data.name '{name}'; choose one of: {known}.")


def num_classes(cfg) -> int:
    """The number of classes, without loading any images (the model head is built from it)."""
    name = _dataset_name(cfg)
    _check_name(name)
    if name == "synthetic":
        _check_synthetic(cfg)
        return int(cfg.num_classes)
    if name == "imagefolder":
        return len(_imagefolder_classes(_imagefolder_root(cfg)))
    if name == "digits":
        return len(DIGIT_CLASSES)
    if name == "custom":
        from finetune import targets

        return len(targets.build_splits(cfg)[2])
    return TORCHVISION_DATASETS[name][1]


# ---------------------------------------------------------------------------------------- transforms


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        known = ", ".join(m.value for m in InterpolationMode)
        raise UserError(f"unknown interpolation '{name}'; choose one of: {known}.") from None


def image_size(cfg, preprocess) -> int:
    """`data.image_size` when set, else the pretrained weights' input size."""
    size = cfg.image_size if cfg.image_size is not None else preprocess.input_size
    if int(size) < 8:
        raise UserError(f"data.image_size must be at least 8 pixels, got {size}.")
    return int(size)


def eval_transform(size: int, preprocess) -> v2.Compose:
    """Resize the short side to size / crop_pct, then centre-crop: the pretrained weights' eval recipe."""
    interp = _interpolation(preprocess.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(math.floor(size / preprocess.crop_pct)), interpolation=interp, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ]
    )


def train_transform(size: int, preprocess, augment: bool, auto_augment: str | None = None,
                    re_prob: float = 0.0) -> Callable:
    """Random resized crop + horizontal flip, normalised like the pretrained weights; eval recipe if not augment.
    `auto_augment` / `re_prob`: timm's train factory instead, with its policy and random erasing."""
    if not augment:
        return eval_transform(size, preprocess)
    if not 0.0 <= re_prob <= 1.0:
        raise UserError(f"data.re_prob: the random-erasing probability must be in [0, 1], got {re_prob}")
    if auto_augment or re_prob:
        return _timm_train_transform(size, preprocess, auto_augment, re_prob)
    interp = _interpolation(preprocess.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ]
    )


def _timm_train_transform(size: int, preprocess, auto_augment: str | None, re_prob: float) -> Callable:
    """timm's ImageNet train transform with finetune's crop scale and flip and no colour jitter (which timm
    adds by default when there is no policy, and the default pipeline does not have)."""
    from timm.data.transforms_factory import transforms_imagenet_train

    try:
        timm_transform = transforms_imagenet_train(size, scale=TRAIN_CROP_SCALE, hflip=0.5, color_jitter=None,
                                         auto_augment=auto_augment or None, interpolation=preprocess.interpolation,
                                         mean=tuple(preprocess.mean), std=tuple(preprocess.std), re_prob=re_prob,
                                         re_mode="pixel")
    except (AssertionError, KeyError, ValueError, IndexError) as e:  # timm's parsing of the policy string
        raise UserError(f"data.auto_augment: timm cannot parse '{auto_augment}' ({type(e).__name__}: {e}); e.g. "
                        "rand-m9-mstd0.5-inc1 (RandAugment), original (AutoAugment), augmix-m5-w4-d2") from None
    for op in _policy_ops(timm_transform):
        if getattr(op, "aug_fn", None) is _timm_posterize():
            op.aug_fn = _posterize_at_least_1_bit
    return v2.Compose([_PIL(), timm_transform])


def _timm_posterize():
    from timm.data import auto_augment

    return auto_augment.posterize


def _policy_ops(transform) -> list:
    """The AugmentOps of timm's policies inside `transform` (RandAugment, AugMix: .ops; AutoAugment: .policy)."""
    found = []
    for t in getattr(transform, "transforms", []):
        found += list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            found += list(sub)
    return found


def _posterize_at_least_1_bit(img, bits_to_keep, **kwargs):
    """timm's posterize at full magnitude keeps 0 bits, which Pillow (>= 11) refuses with an error in the
    middle of training; 1 bit is the strongest posterize Pillow does."""
    return _timm_posterize()(img, max(1, int(bits_to_keep)), **kwargs)


class _PIL:
    """Tensor images (synthetic, digits) as PIL images, which timm's policies operate on."""

    def __call__(self, image):
        return v2.functional.to_pil_image(image) if isinstance(image, torch.Tensor) else image


# --------------------------------------------------------------------------------------- determinism


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (seed, epoch, index...); a pure function of its inputs."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & 0xFFFFFFFFFFFFFFFF))
    return h >> 1  # torch.manual_seed wants a value that fits int64


class EpochSampler(Sampler):
    """Yields `(index, epoch)` keys: a permutation seeded by (seed, epoch), optionally skipping the samples of
    the first `start_step` batches (resume mid-epoch). Runs in the main process, so workers cannot change it.

    With `world` processes each rank takes its `batch_size` slice of every global batch of the same order
    (rank r: samples [r*B, (r+1)*B) of batch s): one step of all ranks together sees exactly the batch
    one process with batch_size x world would, and a resume skips whole global batches on every rank."""

    def __init__(self, size: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 views: int | None = None):
        self.size, self.seed, self.batch_size, self.rank, self.world = size, seed, batch_size, rank, world
        self.views = views  # augmentations repeat every `views` epochs (the feature cache's cache_views)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def _indices(self) -> list[int]:
        order, b = self.order(), self.batch_size
        if self.world == 1:
            return order[self.start_step * b :]
        step = b * self.world  # the tail of fewer than a global batch is dropped on every rank alike
        return [i for s in range(self.start_step, self.size // step)
                for i in order[s * step + self.rank * b : s * step + (self.rank + 1) * b]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        view = self.epoch % self.views if self.views else self.epoch
        for index in self._indices():
            yield index, view

    def __len__(self) -> int:
        if self.world == 1:
            return max(0, self.size - self.start_step * self.batch_size)
        return max(0, self.size // (self.batch_size * self.world) - self.start_step) * self.batch_size


class _Shard(Sampler):
    """Rank r's part of the validation set, indices r, r + world, ...: the ranks' parts are disjoint and
    cover every image once, so metrics summed over ranks are those of one process."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TransformedDataset(Dataset):
    """Applies `transform` to a base (image, label) dataset. Keys are an index (epoch 0) or `(index, epoch)`;
    the transform runs under a forked global RNG seeded by (seed, epoch, index), so the caller's RNG is untouched
    and the result does not depend on which process or in which order the sample is loaded."""

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.base[index]
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = to_rgb(image)  # grayscale (MNIST), palette and 16-bit images -> 8-bit RGB
        # v2 transforms draw from the global CPU generator; fork it so the main process's stream is left
        # alone, and seed that generator alone: torch.manual_seed would reseed every CUDA device too.
        # timm's policies also draw from Python's and NumPy's global generators: seeded the same way.
        key = mix_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(key)
                random.seed(key)
                np.random.seed(key % 2**32)
                image = self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return image, int(label)


# --------------------------------------------------------------------------------------------- loaders


_WORKER_ERROR = re.compile(r"UserError: (.*?)\s*\Z", re.S)


class _Loader(DataLoader):
    """A DataLoader whose user errors raised in worker processes come back as the original one-line message
    (torch re-raises them with the worker's whole traceback as the message)."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                match = _WORKER_ERROR.search(str(e))
                if match is None or not str(e).startswith("Caught UserError"):
                    raise
                raise UserError(match.group(1)) from None
            yield batch


def resolve_workers(requested: int, in_memory: bool) -> int:
    """-1 picks: 0 for the small in-memory sets (worker start-up would dominate), else cores - 1, at most 8."""
    requested = int(requested)
    if requested < -1:
        raise UserError(f"data.num_workers must be -1 (auto) or >= 0, got {requested}.")
    if requested >= 0:
        return requested
    if in_memory:
        return 0
    return max(0, min(8, available_cores() - 1))


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and SLURM narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class DataBundle:
    """Train/val datasets plus their loaders. `train_loader(epoch)` re-points one cached loader (so persistent
    workers survive across epochs): iterate the returned loader before asking for another epoch."""

    train: TransformedDataset
    val: TransformedDataset
    classes: list[str]
    batch_size: int
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    skipped: int = 0  # unreadable images left out (data.skip_bad)
    rank: int = 0  # this process among `world` (finetune/distributed.py); batch_size is per process
    world: int = 1
    views: Optional[int] = None  # augmentations repeat every `views` epochs (cache_views)
    _train_sampler: Optional[EpochSampler] = field(default=None, init=False, repr=False)
    _train_loader: Optional[DataLoader] = field(default=None, init=False, repr=False)
    _val_loader: Optional[DataLoader] = field(default=None, init=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def drop_last(self) -> bool:
        # a final batch of 1 would break BatchNorm in train mode; only drop when there is more than one batch
        return len(self.train) > self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train)
        if self.world > 1:  # the sampler drops the tail itself: every rank takes the same number of steps
            return n // (self.batch_size * self.world)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Optional[Sampler], drop_last: bool):
        workers = self.num_workers
        return _Loader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            # a private generator: the loader's per-iterator base seed must not consume the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        """The shuffled, augmented loader for `epoch`; `start_step` skips that many batches (mid-epoch resume)."""
        if self._train_loader is None:
            self._train_sampler = self.train_sampler(epoch, start_step)
            self._train_loader = self._loader(self.train, self.batch_size, self._train_sampler,
                                              self.drop_last and self.world == 1)
        self._train_sampler.set_epoch(epoch, start_step)
        return self._train_loader

    def train_sampler(self, epoch: int, start_step: int = 0) -> EpochSampler:
        """The order `train_loader(epoch, start_step)` follows, for loaders of other datasets over the same
        samples (the feature cache)."""
        sampler = EpochSampler(len(self.train), self.seed, self.batch_size, self.rank, self.world, self.views)
        sampler.set_epoch(epoch, start_step)
        return sampler

    def val_loader(self) -> DataLoader:
        if self._val_loader is None:
            shard = _Shard(len(self.val), self.rank, self.world) if self.world > 1 else None
            self._val_loader = self._loader(self.val, self.batch_size * 2, shard, False)
        return self._val_loader

    def close(self) -> None:
        """Stop persistent workers now instead of at garbage collection (several runs in one process)."""
        for loader in (self._train_loader, self._val_loader):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()  # what the iterator's __del__ would do later
        self._train_loader = self._val_loader = None


def build_data(
    cfg,
    preprocess,
    *,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    rank: int = 0,
    world: int = 1,
    views: int | None = None,
) -> DataBundle:
    """Datasets and loaders for `cfg` (a DataConfig), preprocessed like the pretrained weights (`preprocess`:
    mean, std, input_size, interpolation, crop_pct); with `world` processes, rank `rank`'s shards."""
    name = _dataset_name(cfg)
    _check_name(name)
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    size = image_size(cfg, preprocess)
    skipped = 0
    if name == "synthetic":
        train_base, val_base, classes = _synthetic_splits(cfg, size)
    elif name == "digits":
        train_base, val_base = (_ImageList(digits_split(split)) for split in ("train", "val"))
        classes = DIGIT_CLASSES
    elif name == "imagefolder":
        train_base, val_base, classes, skipped = _imagefolder_splits(cfg)
    elif name == "custom":
        from finetune import targets

        train_base, val_base, classes = targets.build_splits(cfg)
    else:
        train_base, val_base, classes = _torchvision_splits(cfg, name)
    return DataBundle(
        train=TransformedDataset(train_base, train_transform(size, preprocess, bool(cfg.augment), cfg.auto_augment,
                                                             float(cfg.re_prob)), seed),
        val=TransformedDataset(val_base, eval_transform(size, preprocess), seed),
        classes=list(classes),
        batch_size=int(batch_size),
        seed=int(seed),
        num_workers=resolve_workers(cfg.num_workers, in_memory=name in ("synthetic", "digits")),
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        skipped=skipped,
        rank=rank,
        world=world,
        views=views,
    )


# --------------------------------------------------------------------------------------------- digits

# the embedded real images (finetune/assets/README.md): handwritten digits, far from ImageNet photos
DIGITS_FILE = Path(__file__).resolve().parent / "assets" / "digits.npz"
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


def _imagefolder_root(cfg) -> str:
    if cfg.root is None or str(cfg.root).strip() == "":
        raise UserError("data.root is required for data.name=imagefolder: a folder with train/ and val/ inside.")
    root = os.path.expanduser(str(cfg.root))
    if not os.path.isdir(root):
        raise UserError(f"data.root '{root}' does not exist or is not a folder.")
    return root


def _class_dirs(split_dir: str) -> list[str]:
    # hidden folders (.ipynb_checkpoints, .git) are not classes
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _imagefolder_classes(root: str) -> list[str]:
    """The class names shared by ROOT/train and ROOT/val, validating the layout."""
    found = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserError(f"data.root '{root}' has no '{split}' folder; expected {root}/train and {root}/val.")
        found[split] = _class_dirs(split_dir)
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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the photo is meant to be seen: EXIF orientation applied, and 16/32-bit integer or float
    grey scaled to 8 bits (PIL's convert("RGB") clips them, so a 16-bit PNG comes out almost white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # floats in [0, 1] or in [0, 255]
        else:  # integer grey: 16-bit unless every value fits 8 bits
            top = 255.0 if values.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(im)


class CheckedImageFolder(Dataset):
    """(PIL RGB image, label) from a list of (path, label). An image that fails to decode raises a UserError
    naming the file, or, with skip_bad, is replaced by the next readable sample (deterministic)."""

    def __init__(self, samples: list[tuple[str, int]], skip_bad: bool):
        self.samples, self.skip_bad = samples, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return _load_rgb(path), label
            except Exception as e:
                if not self.skip_bad:
                    message = f"cannot read image '{path}' ({e}); fix or delete it, or set data.skip_bad=true."
                    raise UserError(message) from None
                log.warning("skipping unreadable image %s (%s)", path, e)
        raise UserError("no image in the data set could be read.")


def _scan_split(split_dir: str, classes: list[str]) -> dict[str, list[str]]:
    """Image files per class, sorted, recursing into subfolders."""
    files = {}
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
        files[name] = sorted(found)
    return files


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
    root = _imagefolder_root(cfg)
    classes = _imagefolder_classes(root)
    scanned = {split: _scan_split(os.path.join(root, split), classes) for split in ("train", "val")}
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
