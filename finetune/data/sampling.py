"""The seeded train order and augmentation: a pure function of (seed, epoch, sample index).

The sampler runs in the main process and hands each worker `(index, epoch)` keys; the dataset seeds a
forked RNG from the key before augmenting. So batches do not depend on the global RNG, the number of workers
or on what ran before, which is what an exact resume needs.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from finetune.data.transforms import to_rgb


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
                 views: int | None = None, weights: list[float] | None = None):
        self.size, self.seed, self.batch_size, self.rank, self.world = size, seed, batch_size, rank, world
        self.views = views  # augmentations repeat every `views` epochs (the feature cache's cache_views)
        # data.sampler=balanced: `size` draws with replacement, sample i with probability weights[i] / sum
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.weights is not None:  # a pure function of (seed, epoch) too: the resume draws the same
            return torch.multinomial(self.weights, self.size, replacement=True, generator=g).tolist()
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


class Shard(Sampler):
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
        # a class index, or a multilabel 0/1 vector (finetune/data/labels.py), which collates as it is
        return image, label if isinstance(label, torch.Tensor) and label.dim() else int(label)
