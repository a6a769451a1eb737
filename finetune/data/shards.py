"""data=webdataset: tar shards in webdataset's format (written by `finetune shard`, finetune/data/shard_writer.py)
read as a map-style dataset, so that the seeded sampler (finetune/data/sampling.py) shuffles them per epoch, splits
them across ranks and workers and resumes them exactly, as it does a folder of images.

Each shard is indexed once per process (the offset and size of every member, grouped into samples by
webdataset's key convention: the file name up to its first dot); a sample is then one seek and read. The class
names come from the index.json beside the shards. Shards named by URL (https://, file://, pipe:<command>, ...)
are copied once through webdataset's gopen into $XDG_CACHE_HOME/finetune/shards (~/.cache when unset) and read
from there: the whole set must fit on the local disk (there is no streaming reader).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image
from torch.utils.data import Dataset

from finetune.base.errors import UserError
from finetune.base.files import cache_home, first_line
from finetune.data.transforms import to_rgb

log = logging.getLogger(__name__)

INDEX = "index.json"  # beside the shards: class names, per-split counts and shard files
FORMAT = "finetune-shards/1"
# the fields a sample's image may be stored under, in the order they are looked for
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
LABEL_FIELD = "cls"  # the class index, as decimal text
# webdataset's convention: a member `dir/name.ext.more` belongs to sample `dir/name`, field `ext.more`
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _braceexpand():
    try:
        import braceexpand  # webdataset's own dependency
        import webdataset  # noqa: F401  (the format's library: its writer and gopen)
    except ImportError:
        raise UserError('data=webdataset needs the webdataset package: pip install "finetune[data]"') from None
    return braceexpand.braceexpand


def expand(spec: str) -> list[str]:
    """The shard files or URLs of a brace pattern (DIR/train-{000000..000009}.tar), in order."""
    return [u for u in _braceexpand()(str(spec).strip()) if u]


def brace_pattern(names: list[str]) -> str:
    """A brace pattern for consecutive shard names PREFIX-NNNNNN.tar (the first name when they are not)."""
    found = [re.fullmatch(r"(.*-)(\d+)(\.tar)", n) for n in names]
    if not names or not all(found) or len({(m.group(1), m.group(3), len(m.group(2))) for m in found}) != 1:
        return names[0] if names else ""
    first, last = found[0].group(2), found[-1].group(2)
    return f"{found[0].group(1)}{{{first}..{last}}}{found[0].group(3)}"


def is_remote(url: str) -> bool:
    """A URL for webdataset's gopen (https://, file://, pipe:...) rather than a local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", url)) and not os.path.exists(url)


def cache_root() -> Path:
    """Where shards named by URL are copied: $XDG_CACHE_HOME/finetune/shards (~/.cache when unset)."""
    return cache_home("shards")


def _url_file_name(url: str) -> str:
    if url.startswith("pipe:"):  # the shard's name inside the command (pipe:curl -s https://host/train-0.tar)
        names = re.findall(r"[^\s'\"/]+\.(?:tar|json)\b", url)
        return names[-1] if names else "shard.tar"
    return os.path.basename(urlparse(url).path) or "shard.tar"


def beside(url: str, name: str) -> str:
    """The URL of the file `name` in the same place as the shard `url`."""
    head, sep, tail = url.rpartition(_url_file_name(url))
    return head + name + tail if sep else url


def fetch(url: str, what: str) -> str:
    """A local copy of `url` (copied once through webdataset's gopen; kept for the next run)."""
    from webdataset.gopen import gopen

    dest = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:16] / _url_file_name(url)
    if dest.is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part{os.getpid()}")
    try:
        with gopen(url, "rb") as source, open(part, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except Exception as e:  # gopen's schemes raise what their tools raise (OSError, ValueError, IOError)
        part.unlink(missing_ok=True)
        raise UserError(f"{what}: cannot fetch {url} ({first_line(e)})") from None
    os.replace(part, dest)  # atomic: another process fetching the same file meanwhile is harmless
    return str(dest)


# -------------------------------------------------------------------------------------------- the index


def read_index(what: str, first: str, local_first: str) -> dict:
    """index.json beside the shard `first` (its local copy: `local_first`), checked."""
    if is_remote(first):
        path = fetch(beside(first, INDEX), f"{what} (its {INDEX}, which holds the class names)")
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(local_first)), INDEX)
        if not os.path.isfile(path):
            raise UserError(f"{what}: no {INDEX} beside {first} (finetune shard writes it, with the class names); for "
                            f"shards made elsewhere write one: {{\"classes\": [\"name of class 0\", ...]}}")
    try:
        index = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read {path} ({first_line(e)})") from None
    classes = index.get("classes") if isinstance(index, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{what}: {path} has no \"classes\" list of class names")
    return index


def _known_counts(index: dict, key: str = "count") -> dict:
    """{shard file name: samples} (or with key="class_counts" its samples per class) from an index.json's
    splits."""
    counts = {}
    for split in (index.get("splits") or {}).values():
        for shard in split.get("shards", []):
            if key in shard:
                counts[shard["name"]] = shard[key]
    return counts


def shard_labels(path: str) -> list[int]:
    """The class index of every sample of a local shard (its cls field; -1 where it has none or no number)."""
    labels = []
    with open(path, "rb") as f:
        for _, fields in index_shard(path):
            offset, size = fields.get(LABEL_FIELD, (0, 0))
            f.seek(offset)
            text = f.read(size).strip() if LABEL_FIELD in fields else b""
            labels.append(int(text) if text.lstrip(b"-").isdigit() else -1)
    return labels


def class_counts(files: list[str], index: dict, n_classes: int) -> list[int]:
    """Samples per class in these shards: their index.json entries (finetune shard records them), else the
    labels read from the shards themselves."""
    known = _known_counts(index, "class_counts")
    total = [0] * n_classes
    for path in files:
        counts = known.get(os.path.basename(path))
        if counts is None or len(counts) != n_classes:
            counts = [0] * n_classes
            for label in shard_labels(path):
                if 0 <= label < n_classes:
                    counts[label] += 1
        total = [a + b for a, b in zip(total, counts)]
    return total


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {field: (offset, size)})] of the samples of a tar shard, in order (uncompressed tar only:
    random access needs the members' offsets)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                found = _KEY.match(member.name) if member.isfile() else None
                if found is None:
                    continue
                key, field = found.groups()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][field] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read shard {path} ({first_line(e)}); shards must be uncompressed tar files "
                        "(finetune shard writes them)") from None
    return samples


class ShardImages(Dataset):
    """(PIL RGB image, label) of the samples of local tar shards, shard after shard. A sample that fails to
    decode raises a UserError naming it, or, with skip_bad, is replaced by the next readable one (deterministic)."""

    def __init__(self, files: list[str], counts: list[int], classes: list[str], skip_bad: bool = False):
        self.files, self.counts, self.classes, self.skip_bad = list(files), list(counts), list(classes), skip_bad
        self.starts = list(itertools.accumulate(self.counts, initial=0))
        self._shards: dict[int, list] = {}  # shard number -> its index, built on first use in each process

    def __len__(self) -> int:
        return self.starts[-1]

    def _index(self, shard: int) -> list:
        if shard not in self._shards:
            samples = index_shard(self.files[shard])
            if len(samples) != self.counts[shard]:
                raise UserError(f"shard {self.files[shard]} holds {len(samples)} samples, its {INDEX} says "
                                f"{self.counts[shard]}: write the shards again (finetune shard)")
            self._shards[shard] = samples
        return self._shards[shard]

    def record(self, index: int) -> dict:
        """Sample `index` as webdataset gives it: {"__key__": key, "__shard__": file, field: bytes, ...}."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        key, fields = self._index(shard)[index - self.starts[shard]]
        record = {"__key__": key, "__shard__": self.files[shard]}
        with open(self.files[shard], "rb") as f:
            for field, (offset, size) in fields.items():
                f.seek(offset)
                record[field] = f.read(size)
        return record

    def _decode(self, record: dict):
        where = f"{os.path.basename(record['__shard__'])}:{record['__key__']}"
        field = next((f for f in IMAGE_FIELDS if f in record), None)
        if field is None or LABEL_FIELD not in record:
            fields = ", ".join(k for k in record if not k.startswith("__"))
            raise UserError(f"sample {where} has no {'image' if field is None else LABEL_FIELD} field (it has: "
                            f"{fields}); a sample needs an image ({', '.join(IMAGE_FIELDS)}) and cls, its class index")
        try:
            label = int(record[LABEL_FIELD])
        except ValueError:
            raise UserError(f"sample {where}: cls is not a class index ({record[LABEL_FIELD][:20]!r})") from None
        if not 0 <= label < len(self.classes):
            raise UserError(f"sample {where}: class index {label} is outside the {len(self.classes)} classes of "
                            f"{INDEX}")
        with Image.open(io.BytesIO(record[field])) as image:
            return to_rgb(image), label

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            record = self.record((index + offset) % len(self))
            try:
                return self._decode(record)
            except UserError:
                raise
            except Exception as e:  # PIL raises many types for broken images
                where = f"{record['__key__']} in {record['__shard__']}"
                if not self.skip_bad:
                    raise UserError(f"cannot read image {where} ({first_line(e)}); fix the source and shard it again, "
                                    "or set data.skip_bad=true") from None
                log.warning("skipping unreadable image %s (%s)", where, e)
        raise UserError("no image in the shards could be read.")

    def fingerprint(self) -> str:
        """A digest of the shard files (path, size, modification time): what the auto probe's store keys on."""
        digest = hashlib.sha256()
        for path in self.files:
            st = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ data config


def _spec(cfg, key: str) -> str:
    from omegaconf import OmegaConf

    value = None if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, key) else getattr(cfg, key, None)
    if value is None or str(value).strip() in ("", "???"):
        raise UserError(f"data.{key} is required for data=webdataset: the {key} shards as a brace pattern, quoted: "
                        f"\"data.{key}='DIR/{key}-{{000000..000009}}.tar'\" (finetune shard prints the line)")
    return str(value)


def _shard_set(cfg, key: str) -> tuple[list[str], list[int], list[str]]:
    """(local shard files, samples per shard, class names) of data.<key>."""
    what = f"data.{key}"
    spec = _spec(cfg, key)
    urls = expand(spec)
    if not urls:
        raise UserError(f"{what}: '{spec}' names no shard file")
    remote = [is_remote(u) for u in urls]
    if any(remote):
        log.info("%s: copying %d shard(s) into %s (once)", what, sum(remote), cache_root())
    files = [fetch(u, what) if r else os.path.expanduser(u) for u, r in zip(urls, remote)]
    index = read_index(what, urls[0], files[0])
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        listed = [s["name"] for s in (index.get("splits") or {}).get(key, {}).get("shards", [])]
        hint = (f"; {INDEX} lists {key} shards {brace_pattern(listed)}" if listed else "")
        raise UserError(f"{what}: {len(missing)} of the {len(files)} shards of '{spec}' do not exist (first: "
                        f"{missing[0]}){hint}")
    known = _known_counts(index)
    counts = [int(known[os.path.basename(f)]) if os.path.basename(f) in known else len(index_shard(f)) for f in files]
    if sum(counts) == 0:
        raise UserError(f"{what}: the shards of '{spec}' hold no samples")
    names = list(index["classes"])
    absent = [c for c, n in zip(names, class_counts(files, index, len(names))) if n == 0]
    if absent:  # as an image folder's empty class folder: a class the head has but nothing teaches
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        message = (f"{what}: the shards of '{spec}' hold no sample of {len(absent)} of the {len(names)} classes "
                   f"their {INDEX} names ({shown})")
        if key == "train":
            raise UserError(f"{message}; name every train shard (a brace pattern over all of them) or shard a "
                            "folder of the classes you train")
        log.warning("%s: they are never scored", message)
    return files, counts, names


def classes(cfg) -> list[str]:
    """The class names, from the index.json beside the train shards."""
    spec = _spec(cfg, "train")
    urls = expand(spec)
    if not urls:
        raise UserError(f"data.train: '{spec}' names no shard file")
    first = urls[0]
    local = first if is_remote(first) else os.path.expanduser(first)
    return list(read_index("data.train", first, local)["classes"])


def splits(cfg) -> tuple[ShardImages, ShardImages, list[str]]:
    """(train, val, class names) of data=webdataset."""
    _spec(cfg, "val")  # both named before either is read
    train_files, train_counts, names = _shard_set(cfg, "train")
    val_files, val_counts, val_names = _shard_set(cfg, "val")
    if val_names != names:
        raise UserError(f"data.train and data.val name different classes in their {INDEX} files: {names} and "
                        f"{val_names}")
    skip_bad = bool(getattr(cfg, "skip_bad", False))
    return (ShardImages(train_files, train_counts, names, skip_bad), ShardImages(val_files, val_counts, names, skip_bad),
            names)
