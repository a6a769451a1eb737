"""Loaders over the image sources (finetune/data/datasets.py), transformed like the pretrained weights
(finetune/data/transforms.py) and in the seeded order an exact resume needs (finetune/data/sampling.py).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.base.errors import UserError
from finetune.data import datasets
from finetune.data.resized import cache_resized
from finetune.data.sampling import EpochSampler, Shard, TransformedDataset
from finetune.data.transforms import (
    TRAIN_CROP_SCALE,
    eval_transform,
    image_size,
    train_transform,
)

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
    rank: int = 0  # this process among `world` (finetune/engine/distributed.py); batch_size is per process
    world: int = 1
    views: Optional[int] = None  # augmentations repeat every `views` epochs (cache_views)
    multilabel: bool = False  # labels are sets (a 0/1 vector per image), not one class index
    sampler: str = "shuffle"  # data.sampler: shuffle, or balanced (each class drawn equally often)
    _train_sampler: Optional[EpochSampler] = field(default=None, init=False, repr=False)
    _train_loader: Optional[DataLoader] = field(default=None, init=False, repr=False)
    _val_loader: Optional[DataLoader] = field(default=None, init=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, labels: list[int] | None = None) -> list[int] | None:
        """Train images per class, counted from the listing (or from `labels`, each train image's class);
        None where only the images would tell."""
        labels = datasets.sample_labels(self.train) if labels is None else labels
        if labels is None:
            return None
        return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(self.classes)).tolist()

    def _sample_weights(self) -> list[float] | None:
        """data.sampler=balanced: each image drawn with probability 1 / (its class's count)."""
        if self.sampler != "balanced":
            return None
        labels = datasets.sample_labels(self.train)
        if labels is None:
            raise UserError("data.sampler=balanced needs each image's class without reading the images: an image "
                            "folder, a single-label label file, digits or synthetic")
        counts = self.class_counts(labels)
        return [1.0 / counts[label] for label in labels]

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
        sampler = EpochSampler(len(self.train), self.seed, self.batch_size, self.rank, self.world, self.views,
                               self._sample_weights())
        sampler.set_epoch(epoch, start_step)
        return sampler

    def val_loader(self) -> DataLoader:
        if self._val_loader is None:
            shard = Shard(len(self.val), self.rank, self.world) if self.world > 1 else None
            self._val_loader = self._loader(self.val, self.batch_size * 2, shard, False)
        return self._val_loader

    def close(self) -> None:
        """Stop persistent workers now instead of at garbage collection (several runs in one process).
        torch offers no public way to end a persistent DataLoader's workers: this calls what the worker
        iterator's own __del__ calls, as torch's tests do."""
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
    task_kind: str = "auto",
) -> DataBundle:
    """Datasets and loaders for `cfg` (a DataConfig), preprocessed like the pretrained weights (`preprocess`:
    mean, std, input_size, interpolation, crop_pct); with `world` processes, rank `rank`'s shards; `task_kind`
    (task.kind) for label files."""
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    size = image_size(cfg, preprocess)
    train_base, val_base, classes, skipped = datasets.splits(cfg, size, task_kind)
    if getattr(cfg, "draft", True):  # JPEGs decoded at reduced scale, never below what the transforms read
        eval_side = math.ceil(size / preprocess.crop_pct)
        # a random-resized crop keeps at least TRAIN_CROP_SCALE[0] of the area: its side, at full resolution
        train_side = math.ceil(size / math.sqrt(TRAIN_CROP_SCALE[0])) if cfg.augment else eval_side
        for base, side in ((train_base, train_side), (val_base, eval_side)):
            if hasattr(base, "min_side"):
                base.min_side = side
                if getattr(cfg, "cache_resized", False):
                    base.samples, _ = cache_resized(base.samples, side, progress=getattr(cfg, "progress", True))
    multilabel = bool(getattr(train_base, "multilabel", False))
    if len(classes) < 2 and not multilabel:  # one class: every prediction is right, val acc 1.000 says nothing
        raise UserError(f"the data has {len(classes)} class ({', '.join(map(str, classes))}); a classifier needs at "
                        "least 2: add a folder per class (ImageFolder: train/<class>/, val/<class>/)")
    return DataBundle(
        train=TransformedDataset(train_base, train_transform(size, preprocess, bool(cfg.augment), cfg.auto_augment,
                                                             float(cfg.re_prob)), seed),
        val=TransformedDataset(val_base, eval_transform(size, preprocess), seed),
        classes=list(classes),
        batch_size=int(batch_size),
        seed=int(seed),
        num_workers=resolve_workers(cfg.num_workers, in_memory=datasets.dataset_name(cfg) in datasets.IN_MEMORY),
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        skipped=skipped,
        rank=rank,
        world=world,
        views=views,
        multilabel=multilabel,
        sampler=str(getattr(cfg, "sampler", "shuffle")),
    )
