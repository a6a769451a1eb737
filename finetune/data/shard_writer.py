"""`finetune shard`: an ImageFolder (ROOT/train/<class>/*, ROOT/val/<class>/*) written as webdataset tar shards,
OUT/train-000000.tar ... and OUT/val-000000.tar ..., with OUT/index.json (class names, per-split counts, the shard
files) that data=webdataset reads the class names from (finetune/data/shards.py).

Samples go in the order an ImageFolder lists them (class by class, files sorted), `shard_size` to a shard, each
with its key (its position in the split), the image bytes as stored (or, with `max_side`, a larger image
scaled down to it and re-encoded as JPEG), `cls` (the class index) and `json` (its class and path in the folder).
The tar headers carry no time, owner or host: the same folder gives byte-identical shards, and a folder whose
listing (paths, sizes, modification times) and settings match what index.json recorded is not written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from finetune.base.errors import UserError
from finetune.config.schema import DataConfig
from finetune.data import datasets, shards
from finetune.data.transforms import to_rgb
from finetune.output.progress import bar

log = logging.getLogger("finetune")

SPLITS = ("train", "val")
JPEG_QUALITY = 90  # re-encoded images (max_side)
TAR_MTIME = 0  # every member's modification time: shards depend on the images alone


def _listing(root: str, classes: list[str]) -> dict[str, dict[str, list[str]]]:
    return {split: datasets.scan_split(os.path.join(root, split), classes) for split in SPLITS}


def listing_digest(root: str, listing: dict, settings: dict) -> str:
    """A digest of the source files (relative path, size, modification time) and of the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in SPLITS:
        for name, files in listing[split].items():
            for path in files:
                st = os.stat(path)
                digest.update(f"{os.path.relpath(path, root)}\0{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _up_to_date(out: Path, digest: str) -> dict | None:
    """The index.json in `out` when it records this digest and its shards are there, at their sizes."""
    try:
        index = json.loads((out / shards.INDEX).read_text())
        if index.get("source", {}).get("listing") != digest:
            return None
        for split in index["splits"].values():
            for shard in split["shards"]:
                if (out / shard["name"]).stat().st_size != shard["bytes"]:
                    return None
        return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _image_bytes(path: str, max_side: int | None, skip_bad: bool) -> tuple[bytes, str] | None:
    """(bytes, field) of an image: as stored, or re-encoded when larger than max_side; None: unreadable and
    skip_bad."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if max_side and max(image.size) > max_side:
                rgb = to_rgb(image)  # EXIF orientation applied: the JPEG stores the pixels as they are seen
                w, h = rgb.size
                scale = max_side / max(w, h)
                small = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
                out = io.BytesIO()
                small.save(out, "JPEG", quality=JPEG_QUALITY)
                return out.getvalue(), "jpg"
            image.load() if skip_bad else image.verify()  # a full decode finds truncated files too
    except Exception as e:  # PIL raises many types for broken files
        if skip_bad:
            log.warning("skipping unreadable image %s (%s)", path, e)
            return None
        raise UserError(f"cannot read image '{path}' ({e}); fix or delete it, or set data.skip_bad=true") from None
    return data, ("jpg" if ext == "jpeg" else ext) if ext in shards.IMAGE_FIELDS else "img"


def _write_split(out: Path, split: str, root: str, classes: list[str], files: dict[str, list[str]],
                 shard_size: int, max_side: int | None, skip_bad: bool, advance) -> dict:
    from webdataset import ShardWriter

    pattern = os.path.join(str(out).replace("%", "%%"), f"{split}-%06d.tar")  # ShardWriter fills in %06d
    written, counts, skipped = [], [], 0
    class_counts = [0] * len(classes)
    per_shard: list[list[int]] = []  # class counts of each shard: a reader of some of the shards checks its classes
    writer = ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, encoder=False,
                         mtime=TAR_MTIME, post=written.append)
    try:
        index = 0
        for label, name in enumerate(classes):
            for path in files[name]:
                advance()
                image = _image_bytes(path, max_side, skip_bad)
                if image is None:
                    skipped += 1
                    continue
                data, field = image
                meta = {"class": name, "path": os.path.relpath(path, os.path.join(root, split))}
                writer.write({"__key__": f"{index:08d}", field: data, shards.LABEL_FIELD: str(label).encode(),
                              "json": json.dumps(meta, sort_keys=True).encode()})
                class_counts[label] += 1
                if index % shard_size == 0:
                    per_shard.append([0] * len(classes))
                per_shard[-1][label] += 1
                index += 1
            if class_counts[label] == 0:
                raise UserError(f"class folder '{os.path.join(root, split, name)}' has no readable images")
    finally:
        writer.close()
    for i in range(len(written)):
        counts.append(min(shard_size, index - i * shard_size))
    names = [os.path.basename(f) for f in written]
    return {"count": index, "class_counts": class_counts, "skipped": skipped,
            "shards": [{"name": n, "count": c, "bytes": (out / n).stat().st_size, "class_counts": k}
                       for n, c, k in zip(names, counts, per_shard)]}


def write_shards(root: str, out: str, shard_size: int = 1000, max_side: int | None = None, skip_bad: bool = False,
                 progress: bool = True) -> tuple[dict, bool]:
    """Shard the ImageFolder `root` into `out`: (its index.json, whether anything was written)."""
    if int(shard_size) < 1:
        raise UserError(f"shard: shard_size must be at least 1, got {shard_size}")
    if max_side is not None and int(max_side) < 8:
        raise UserError(f"shard: max_side must be at least 8 pixels (or null: the images as stored), got {max_side}")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "imagefolder", "root": root})
    root = datasets.imagefolder_root(cfg)
    datasets.num_classes(cfg)  # checks the layout: train/ and val/, the same class folders in both
    classes = datasets.class_dirs(os.path.join(root, "train"))
    listing = _listing(root, classes)
    settings = {"format": shards.FORMAT, "shard_size": int(shard_size), "max_side": max_side, "skip_bad": skip_bad,
                "jpeg_quality": JPEG_QUALITY}
    digest = listing_digest(root, listing, settings)
    target = Path(os.path.expanduser(out))
    if target.exists() and not target.is_dir():
        raise UserError(f"shard: out={out} is a file, not a folder")
    done = _up_to_date(target, digest)
    if done is not None:
        return done, False
    if Path(root).resolve() == target.resolve() or Path(root).resolve() in target.resolve().parents:
        raise UserError(f"shard: out={out} lies inside data.root={root}: the shards would become images of it")
    target.mkdir(parents=True, exist_ok=True)
    old_index = target / shards.INDEX
    stale = set()
    if old_index.is_file():  # the shards of an earlier run that this one may not overwrite: removed after it
        try:
            stale = {s["name"] for split in json.loads(old_index.read_text())["splits"].values() for s in split["shards"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            stale = set()
        old_index.unlink()  # an interrupted run must not look done
    total = sum(len(f) for split in SPLITS for f in listing[split].values())
    splits = {}
    with bar(total, "sharding", enabled=progress) as advance:
        for split in SPLITS:
            splits[split] = _write_split(target, split, root, classes, listing[split], int(shard_size), max_side,
                                         skip_bad, advance)
    for name in stale - {s["name"] for split in splits.values() for s in split["shards"]}:
        (target / name).unlink(missing_ok=True)
    index = {"format": shards.FORMAT, "classes": classes, "splits": splits,
             "settings": {k: v for k, v in settings.items() if k != "format"},
             "source": {"root": root, "listing": digest}}
    part = target / f"{shards.INDEX}.part"
    part.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(part, target / shards.INDEX)
    return index, True


def train_command(out: str, index: dict) -> str:
    """The `finetune train` line that trains on the shards in `out`."""
    args = []
    for split in SPLITS:
        pattern = shards.brace_pattern([s["name"] for s in index["splits"][split]["shards"]])
        args.append(f"\"data.{split}='{os.path.join(out, pattern)}'\"")
    return "finetune train data=webdataset " + " ".join(args)
