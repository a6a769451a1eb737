"""data=hf: a Hugging Face dataset (the `datasets` library) as a map-style dataset of (PIL RGB image, label), so
that the seeded sampler (finetune/data/sampling.py) shuffles, shards and resumes it exactly as it does a folder.

`data.path` is a hub id (datasets.load_dataset: downloaded once into the datasets cache), a directory written by
save_to_disk (a DatasetDict), or a folder load_dataset reads (an image folder DIR/train/<class>/,
DIR/validation/<class>/; parquet files). The class names come from the label column's ClassLabel feature (a
column of strings: its sorted values). Streaming (datasets' IterableDataset) is not supported: the whole split
is read through the map-style Dataset (Arrow files, memory-mapped).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from finetune.base.errors import UserError
from finetune.base.files import first_line
from finetune.data.transforms import to_rgb

log = logging.getLogger(__name__)

SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict, a Dataset)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError('data=hf needs the datasets package: pip install "finetune[data]"') from None
    return datasets


def _hub_error(path: str, err: BaseException) -> UserError:
    from datasets import config

    return UserError(
        f"data.path: loading '{path}' from the Hugging Face hub failed ({first_line(err)}); without a network, on a "
        f"machine with one run datasets.load_dataset('{path}').save_to_disk(DIR), copy DIR here and set data.path=DIR "
        f"(or keep it in the datasets cache {config.HF_DATASETS_CACHE} and set HF_DATASETS_OFFLINE=1)")


@functools.lru_cache(maxsize=4)
def load(path: str):
    """The DatasetDict `data.path` names (loaded once per process)."""
    hf = _datasets()
    local = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(local):
        if any(os.path.isfile(os.path.join(local, m)) for m in SAVED_MARKERS):
            try:
                loaded = hf.load_from_disk(local)
            except (OSError, ValueError) as e:
                raise UserError(f"data.path: cannot read the saved dataset {local} ({first_line(e)})") from None
        else:
            try:
                loaded = hf.load_dataset(local)
            except (OSError, ValueError) as e:  # DataFilesNotFoundError, EmptyDatasetError are both
                raise UserError(f"data.path: datasets cannot read the folder {local} ({first_line(e)}); give a "
                                "directory written by save_to_disk, or an image folder DIR/train/<class>/, "
                                "DIR/validation/<class>/") from None
    elif path.startswith(("/", ".", "~")) or os.path.exists(local) or path.count("/") > 1:
        raise UserError(f"data.path: the directory {local} does not exist (a hub id looks like org/name)")
    else:
        try:
            loaded = hf.load_dataset(path)
        except (OSError, ValueError) as e:  # offline: ConnectionError; unknown id: DatasetNotFoundError (OSErrors)
            raise _hub_error(path, e) from None
    if not isinstance(loaded, hf.DatasetDict):
        raise UserError(f"data.path: {path} is one split ({len(loaded)} rows), not a DatasetDict of a train and a "
                        "validation split; save both: DatasetDict(train=..., validation=...).save_to_disk(DIR)")
    return loaded


def _split(data, name: str, key: str):
    if name not in data:
        raise UserError(f"data.{key}: the dataset has no split '{name}' (it has: {', '.join(data)}); set "
                        f"data.{key}=<one of them>")
    return data[name]


def _columns(split, cfg, split_name: str) -> None:
    for key in ("image_column", "label_column"):
        column = str(getattr(cfg, key))
        if column not in split.column_names:
            raise UserError(f"data.{key}: split '{split_name}' has no column '{column}' (it has: "
                            f"{', '.join(split.column_names)})")


def _label_names(train, val, column: str) -> tuple[list[str], dict | None]:
    """(class names, {label value: index} for string labels, else None)."""
    from datasets import ClassLabel, Value

    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        other = val.features[column]
        if isinstance(other, ClassLabel) and list(other.names) != list(feature.names):
            raise UserError(f"data.label_column '{column}': the train and val splits name different classes "
                            f"({feature.names} and {other.names})")
        return [str(n) for n in feature.names], None
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        names = sorted({str(v) for v in train.unique(column)} | {str(v) for v in val.unique(column)})
        return names, {n: i for i, n in enumerate(names)}
    raise UserError(f"data.label_column '{column}' is {feature}, not a ClassLabel, so the class names are unknown: "
                    f"cast it (dataset.cast_column('{column}', ClassLabel(names=[...])), then save_to_disk), or set "
                    f"data.label_column to the column that names the classes (columns: {', '.join(train.column_names)})")


def _as_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # an Image feature, decode=False
        import io

        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, str) and os.path.isfile(value):
        return Image.open(value)
    array = np.asarray(value)
    if array.ndim in (2, 3) and array.size:
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    raise ValueError(f"not an image: {type(value).__name__}")


class HFImages(Dataset):
    """(PIL RGB image, label) of one split of a Hugging Face dataset. An image that fails to decode raises a
    UserError naming its row, or, with skip_bad, is replaced by the next readable one (deterministic)."""

    def __init__(self, split, image_column: str, label_column: str, to_index: dict | None, name: str,
                 classes: list[str], skip_bad: bool = False):
        self.data = split.select_columns([image_column, label_column])  # no decoding of the other columns
        self.image_column, self.label_column, self.to_index = image_column, label_column, to_index
        self.name, self.classes, self.skip_bad = name, classes, skip_bad

    def __len__(self) -> int:
        return len(self.data)

    def _label(self, value, row: int) -> int:
        label = self.to_index.get(str(value), -1) if self.to_index is not None else int(value)
        if not 0 <= label < len(self.classes):
            raise UserError(f"split '{self.name}' row {row}: label {value!r} is not one of the {len(self.classes)} "
                            "classes (-1 marks an unlabelled row, as in many test splits: choose a labelled split)")
        return label

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            row = (index + offset) % len(self)
            try:
                sample = self.data[row]
                label = self._label(sample[self.label_column], row)
                return to_rgb(_as_image(sample[self.image_column])), label
            except UserError:
                raise
            except Exception as e:  # PIL and datasets' decoding raise many types for broken images
                if not self.skip_bad:
                    raise UserError(f"cannot read the image of split '{self.name}' row {row} ({first_line(e)}); fix "
                                    "it or set data.skip_bad=true") from None
                log.warning("skipping unreadable image: split '%s' row %d (%s)", self.name, row, e)
        raise UserError(f"no image in split '{self.name}' could be read.")

    def fingerprint(self) -> str | None:
        """The datasets library's fingerprint of the split (what the auto probe's store keys on)."""
        return getattr(self.data, "_fingerprint", None)


def _path(cfg) -> str:
    from omegaconf import OmegaConf

    value = None if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "path") else getattr(cfg, "path", None)
    if value is None or str(value).strip() in ("", "???"):
        raise UserError("data.path is required for data=hf: a hub id, a directory written by save_to_disk, or an "
                        "image folder")
    return str(value).strip()


def _parts(cfg):
    data = load(_path(cfg))
    train = _split(data, str(cfg.train_split), "train_split")
    val = _split(data, str(cfg.val_split), "val_split")
    _columns(train, cfg, str(cfg.train_split))
    _columns(val, cfg, str(cfg.val_split))
    names, to_index = _label_names(train, val, str(cfg.label_column))
    return train, val, names, to_index


def classes(cfg) -> list[str]:
    return _parts(cfg)[2]


def splits(cfg) -> tuple[HFImages, HFImages, list[str]]:
    """(train, val, class names) of data=hf."""
    train, val, names, to_index = _parts(cfg)
    skip_bad = bool(getattr(cfg, "skip_bad", False))
    image, label = str(cfg.image_column), str(cfg.label_column)
    return (HFImages(train, image, label, to_index, str(cfg.train_split), names, skip_bad),
            HFImages(val, image, label, to_index, str(cfg.val_split), names, skip_bad), names)
