"""data.cache_resized=true: a one-off copy of the images at the size the transforms read, so that every
later epoch (and run) decodes a small JPEG instead of a camera photo.

Each image whose short side is above the split's `min_side` (what a random crop reads at full resolution,
or the eval resize) is decoded once (draft decoding helps), scaled so that its short side is `min_side`,
and saved as a JPEG of quality 95 under $XDG_CACHE_HOME/finetune/resized/ (~/.cache when unset), named by
a digest of the source's path, size and modification time and of `min_side`: a changed file is copied
again, another training size gets copies of its own. Smaller images are read where they are. The copies
differ from the sources by one resize and one JPEG encoding: the run's numbers differ slightly from a run
without the cache, as with draft decoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from PIL import Image

from finetune.base.files import cache_home
from finetune.data.images import load_rgb
from finetune.output.progress import bar

log = logging.getLogger("finetune")


def resized_root() -> Path:
    return cache_home("resized")


def _target(path: str, min_side: int, root: Path) -> Path:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{min_side}"
    return root / str(min_side) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jpg"


def cache_resized(samples: list[tuple[str, int]], min_side: int, progress: bool = True,
                  root: Path | None = None) -> tuple[list[tuple[str, int]], int]:
    """`samples` with each image larger than `min_side` replaced by its resized copy (made now if missing);
    also how many copies were made."""
    root = root or resized_root()
    out, todo = [], []
    for path, label in samples:
        with Image.open(path) as im:
            small = min(im.size) <= min_side
        target = None if small else _target(path, min_side, root)
        out.append((path if target is None else str(target), label))
        if target is not None and not target.is_file():
            todo.append((path, target))
    if todo:
        with bar(len(todo), f"resizing {len(todo)} images once", enabled=progress) as advance:
            for path, target in todo:
                image = load_rgb(path, min_side)
                w, h = image.size
                scale = min_side / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                                     reducing_gap=None)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # a killed run leaves no half file
                image.save(tmp, format="JPEG", quality=95)
                os.replace(tmp, target)
                advance()
        log.info("data.cache_resized: %d images resized to a short side of %d px in %s", len(todo), min_side,
                 root / str(min_side))
    return out, len(todo)
