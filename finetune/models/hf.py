"""Hugging Face transformers image classifiers (``model.source=hf``): ``model.name`` is a hub id
(``google/vit-base-patch16-224``, downloaded into the Hugging Face cache) or a local directory written by
``save_pretrained`` (config.json and the weights; preprocessor_config.json for the preprocessing).

Whatever ``AutoModelForImageClassification`` builds works (ViT, DeiT, BEiT, DINOv2, ConvNeXt(V2), Swin(V2),
CLIP / SigLIP vision, ...). The transformers model sits in HFClassifier under the attribute ``hf``, so every
parameter name is ``hf.`` + its transformers name (``hf.vit.layers.0...``, ``hf.classifier.weight``);
HFClassifier's forward returns the logits tensor the engine expects.

``model.weights``: ``DEFAULT`` (the pretrained weights of model.name), ``null`` (random init from its
config.json) or a local state-dict file with the model's parameter names (finetune's ``hf.`` ones, as in an
export's model.safetensors, or the same without the prefix). Weights saved by transformers belong in
model.name's directory: its save_pretrained files may use older names it converts when loading.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.base.files import first_line
from finetune.models.heads import HeadLinear, last_layer
from finetune.models.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    is_under,
    load_into,
)

log = logging.getLogger("finetune")
PREFIX = "hf"  # HFClassifier's attribute holding the transformers model: parameter names start with "hf."
# PIL resampling filters (the ints transformers' image processors store) as torchvision interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFClassifier(nn.Module):
    """A transformers image classifier called as ``model(x) -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        # ViT-like models refuse another input size than their config's unless asked to interpolate their
        # position embeddings; at that size they skip the interpolation themselves (eager mode)
        accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.forward_kwargs = {"interpolate_pos_encoding": True} if accepts else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hf(pixel_values=x, **self.forward_kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    @property
    def image_size(self) -> int | None:
        """The config's input size (a ViT's position embeddings are for it), None for convolutional models."""
        config = getattr(self.hf.config, "vision_config", None) or self.hf.config
        size = getattr(config, "image_size", None)
        return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError('model.source=hf needs transformers: pip install "finetune[hf]"') from None
    return transformers


def local_dir(name: str) -> str | None:
    """The absolute directory `name` names, None for a hub id; a path that is no model directory fails."""
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"model.name: {path} has no config.json; give a directory written by a transformers "
                            "model's save_pretrained, or a Hugging Face hub id")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise UserError(f"model.name: the directory {path} does not exist (a hub id looks like org/name)")
    return None


def _load_error(name: str, err: BaseException) -> UserError:
    from huggingface_hub.constants import HF_HUB_CACHE

    return UserError(
        f"model.name: loading '{name}' from the Hugging Face hub failed ({first_line(err)}); put the repo in the "
        f"Hugging Face cache {HF_HUB_CACHE} (with HF_HUB_OFFLINE=1 a cached copy loads without network retries), "
        "or set model.name=<a local directory written by save_pretrained>"
    )


def _config(name: str, num_classes: int):
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as known,
    )

    try:  # download failures are OSErrors (transformers' own, and huggingface_hub's errors subclass it)
        config = transformers.AutoConfig.from_pretrained(name)
    except OSError as e:
        raise _load_error(name, e) from None
    except ValueError as e:  # a config.json without a model type transformers knows
        raise UserError(f"model.name: {name}: {first_line(e)}") from None
    if config.model_type not in known:
        raise UserError(f"model.name: {name} is a '{config.model_type}' model, which transformers does not build "
                        f"as an image classifier; model types it does: {', '.join(sorted(known))}")
    config.num_labels = num_classes  # (not a from_pretrained argument: it warns that id2label has another size)
    return config


@contextlib.contextmanager
def _quiet(transformers):
    """No progress bar or load report from transformers: the classifier's size mismatch it reports is
    expected here, and finetune logs the keys that matter itself."""
    logging_ = transformers.utils.logging
    verbosity, bar = logging_.get_verbosity(), logging_.is_progress_bar_enabled()
    logging_.set_verbosity_error()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        logging_.set_verbosity(verbosity)
        if bar:
            logging_.enable_progress_bar()


def construct(name: str, weights: str | None, num_classes: int) -> HFClassifier:
    """The classifier of `name` (hub id or absolute local dir) with `num_classes` outputs: pretrained
    weights when `weights` is DEFAULT, random init when None. The head is replaced by fresh_head."""
    transformers = _transformers()
    if weights not in (None, "DEFAULT"):
        raise UserError(f"model.weights: '{weights}' is not a choice for a Hugging Face model; use DEFAULT (the "
                        "weights of model.name), null (random init) or a local state-dict file")
    config = _config(name, num_classes)
    auto = transformers.AutoModelForImageClassification
    if weights is None:
        with _quiet(transformers):
            return HFClassifier(auto.from_config(config).float())
    try:
        with _quiet(transformers):  # ignore_mismatched_sizes: the checkpoint's classifier has its own classes
            model, info = auto.from_pretrained(name, config=config, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
    except OSError as e:
        raise _load_error(name, e) from None
    head = _children(model)[1]
    fresh = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] not in head)
    if fresh:
        log.warning("model.name: %d tensors of %s are not in its weights and start random (%s)", len(fresh), name,
                    ", ".join(fresh[:3]) + (", ..." if len(fresh) > 3 else ""))
    return HFClassifier(model.float())  # transformers may load a checkpoint in its stored dtype (bf16)


def _children(model: nn.Module) -> tuple[str, list[str]]:
    """(the backbone: the transformers model's child with the most parameters, its other children)."""
    sizes = {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()}
    backbone = max(sizes, key=sizes.get)
    return backbone, [n for n, k in sizes.items() if k and n != backbone]


def body(model: HFClassifier) -> str:
    """Path of the backbone (``hf.vit``, ``hf.convnext``, ``hf.vision_model``)."""
    return f"{PREFIX}.{_children(model.hf)[0]}"


def heads(model: HFClassifier) -> list[str]:
    """Paths of the classifier(s): the transformers model's children besides its backbone (``hf.classifier``;
    DeiT distilled: ``hf.cls_classifier`` and ``hf.distillation_classifier``); else its last Linear."""
    others = _children(model.hf)[1]
    return [f"{PREFIX}.{n}" for n in others] or [f"{PREFIX}.{last_layer(model.hf)}"]


def fresh_head(model: HFClassifier, num_classes: int, drop_rate: float) -> None:
    """A new classifier even when the pretrained one already had `num_classes` outputs: each Linear head
    becomes a HeadLinear (same parameter names, dropout `drop_rate` on its input); other heads are reset."""
    for path in heads(model):
        old = model.get_submodule(path)
        if isinstance(old, nn.Linear):
            new = HeadLinear(old.in_features, num_classes, drop_rate).to(old.weight.device)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
            continue
        if drop_rate > 0:
            raise UserError(f"model.drop_rate: the head {path} of this model is a {type(old).__name__}, not a Linear "
                            "layer; dropout before it is not supported (set model.drop_rate=0)")
        for module in old.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def load_file(model: HFClassifier, sd: dict[str, torch.Tensor], what: str) -> None:
    """A local state dict into `model` (after fresh_head): a classifier that fits the new head is loaded (a
    fine-tuned checkpoint), one of another size is left out (a pretrained backbone)."""
    if not any(k.startswith(PREFIX + ".") for k in sd):  # the transformers model's own state_dict()
        sd = {f"{PREFIX}.{k}": v for k, v in sd.items()}
    own, head = model.state_dict(), heads(model)
    sd = {k: v for k, v in sd.items()
          if not (is_under(k, head) and k in own and tuple(v.shape) != tuple(own[k].shape))}
    load_into(model, sd, what, optional=lambda k: is_under(k, head))


def _field(size, key: str):
    """A size entry of an image processor: a dict in transformers 4, a SizeDict in 5."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def preprocess(name: str, model: HFClassifier) -> Preprocess:
    """The preprocessing of `name`'s image processor (preprocessor_config.json): mean, std, input size,
    resampling and the share of the resized image the centre crop keeps. ImageNet defaults at the
    config's image size when the model has no processor."""
    transformers = _transformers()
    try:
        p = transformers.AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        size = model.image_size or 224
        log.warning("model.name: %s has no image processor (preprocessor_config.json); using ImageNet's mean and "
                    "std at %d px", name, size)
        return Preprocess(IMAGENET_MEAN, IMAGENET_STD, int(size), "bilinear", 0.875)
    size = _field(getattr(p, "size", None), "shortest_edge") or _field(getattr(p, "size", None), "height")
    crop = _field(getattr(p, "crop_size", None), "height") if getattr(p, "do_center_crop", False) else None
    crop_pct = getattr(p, "crop_pct", None)
    if crop and size:  # resize the short side to `size`, then crop `crop` (DeiT, DINOv2, CLIP)
        input_size, pct = crop, crop / size
    elif crop_pct and _field(p.size, "shortest_edge") and size < 384:
        # ConvNeXt: below 384 px, resize to size / crop_pct and crop `size`; from 384 px it warps, no crop
        input_size, pct = size, crop_pct
    else:
        input_size, pct = size or model.image_size or 224, 1.0
    resample = getattr(p, "resample", None)
    resample = "bilinear" if resample is None else _RESAMPLE.get(int(resample), "bilinear")
    mean = tuple(float(v) for v in (getattr(p, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(p, "image_std", None) or IMAGENET_STD))
    return Preprocess(mean, std, int(input_size), resample, float(pct))
