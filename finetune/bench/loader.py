"""How fast the train loader decodes (scripts/bench_loader.py): images per second of one loader worker
through finetune's own train pipeline (decode, random resized crop, flip, tensor, normalise), for

- `full`: every JPEG decoded at full size (data.draft=false, the path before draft decoding),
- `draft`: large JPEGs decoded at reduced scale (data.draft=true, the default),
- `resized`: data.cache_resized=true, after its one-off copy (timed apart: `resize_s`),
- `memory`: the same images already decoded, held as uint8 tensors (no decode at all: the ceiling),

on camera-sized photos (shared photos upscaled to 4000x3000 JPEGs) and on the small photos as they are.
The modes alternate within a repeat and each rate is the median over repeats, so that a machine's load
changing during the run moves all three alike.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from finetune.data import images
from finetune.data.loaders import build_data
from finetune.models.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocess

MODES = ("full", "draft", "resized", "memory")


def make_photos(source: Path, out: Path, n: int, size: tuple[int, int] | None) -> Path:
    """An ImageFolder of `n` train images (and 2 val images a class) from `source`'s train split, each resized
    to `size` (None: copied as they are) and saved as JPEG (quality 90), as a camera would."""
    if out.exists():
        shutil.rmtree(out)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    per_class = -(-n // len(classes))
    for split, count in (("train", per_class), ("val", 2)):
        for name in classes:
            (out / split / name).mkdir(parents=True)
            files = sorted((source / "train" / name).iterdir())[:count]
            for f in files:
                if size is None:
                    shutil.copy(f, out / split / name / f.name)
                else:
                    with Image.open(f) as im:
                        im.convert("RGB").resize(size, Image.BICUBIC).save(out / split / name / f"{f.stem}.jpg",
                                                                           quality=90)
    return out


def _data(root: Path, draft: bool, size: int, resized: bool = False):
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(root), "image_size": size, "augment": True,
                            "auto_augment": None, "re_prob": 0.0, "num_workers": 0, "skip_bad": False,
                            "draft": draft, "cache_resized": resized, "progress": False})
    preprocess = Preprocess(IMAGENET_MEAN, IMAGENET_STD, size, "bilinear", 0.875)
    return build_data(cfg, preprocess, batch_size=8, seed=0)


def _in_memory(data):
    """The train set's images decoded once, as uint8 tensors, behind the same transform."""
    base = data.train.base
    images = [torch.from_numpy(np.array(images.load_rgb(p))).permute(2, 0, 1)
              for p, _ in base.samples]
    labels = [label for _, label in base.samples]

    class Decoded(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            return images[index], labels[index]

    data.train.base = Decoded()
    return data


def rate(data, epoch: int) -> float:
    """Images per second of one pass over the train set (batches of 8, the main process decoding)."""
    start, seen = time.perf_counter(), 0
    for x, _ in data.train_loader(epoch):
        seen += len(x)
    return seen / (time.perf_counter() - start)


def measure(root: Path, size: int, repeats: int) -> dict[str, float]:
    """Median images/s of each mode over `repeats` passes, the modes alternating."""
    start = time.perf_counter()
    resized = _data(root, True, size, resized=True)  # its one-off copy (under $XDG_CACHE_HOME)
    resize_s = time.perf_counter() - start
    loaders = {"full": _data(root, False, size), "draft": _data(root, True, size), "resized": resized,
               "memory": _in_memory(_data(root, False, size))}
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats + 1):  # the first pass warms the page cache: not counted
        for mode in MODES:
            value = rate(loaders[mode], r)
            if r:
                rates[mode].append(value)
    return {**{m: statistics.median(v) for m, v in rates.items()}, "resize_s": resize_s}


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| photos | full decode | draft decode | resized cache (one-off copy) | in-memory tensors "
             "| draft / full | resized / full | draft / memory |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['full']:.1f} img/s | {r['draft']:.1f} img/s | {r['resized']:.1f} img/s "
                     f"({r['resize_s']:.1f} s) | {r['memory']:.1f} img/s | {r['draft'] / r['full']:.2f} "
                     f"| {r['resized'] / r['full']:.2f} | {r['draft'] / r['memory']:.2f} |")
    return "\n".join(lines)
