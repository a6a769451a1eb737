"""Image transforms: the pretrained weights' eval recipe, the train crops and flips, timm's policies and
random erasing; any image as 8-bit RGB."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

from finetune.base.errors import UserError

# Random-resized-crop scale range: milder than ImageNet's (0.08, 1) because fine-tuning sets are small and
# objects often fill the frame; very small crops would mostly destroy the label.
TRAIN_CROP_SCALE = (0.35, 1.0)


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        known = ", ".join(m.value for m in InterpolationMode)
        raise UserError(f"unknown interpolation '{name}'; choose one of: {known}.") from None


def image_size(cfg, preprocess) -> int:
    """`data.image_size` when set, else the pretrained weights' input size."""
    size = cfg.image_size if cfg.image_size is not None else preprocess.input_size
    if int(size) < 8:
        raise UserError(f"data.image_size must be at least 8 pixels, got {size}.")
    return int(size)


def eval_transform(size: int, preprocess) -> v2.Compose:
    """Resize the short side to size / crop_pct, then centre-crop: the pretrained weights' eval recipe."""
    interp = _interpolation(preprocess.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(math.floor(size / preprocess.crop_pct)), interpolation=interp, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ]
    )


def train_transform(size: int, preprocess, augment: bool, auto_augment: str | None = None,
                    re_prob: float = 0.0) -> Callable:
    """Random resized crop + horizontal flip, normalised like the pretrained weights; eval recipe if not augment.
    `auto_augment` / `re_prob`: timm's train factory instead, with its policy and random erasing."""
    if not augment:
        return eval_transform(size, preprocess)
    if not 0.0 <= re_prob <= 1.0:
        raise UserError(f"data.re_prob: the random-erasing probability must be in [0, 1], got {re_prob}")
    if auto_augment or re_prob:
        return _timm_train_transform(size, preprocess, auto_augment, re_prob)
    interp = _interpolation(preprocess.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ]
    )


def _timm_train_transform(size: int, preprocess, auto_augment: str | None, re_prob: float) -> Callable:
    """timm's ImageNet train transform with finetune's crop scale and flip and no colour jitter (which timm
    adds by default when there is no policy, and the default pipeline does not have)."""
    from timm.data.transforms_factory import transforms_imagenet_train

    try:
        timm_transform = transforms_imagenet_train(size, scale=TRAIN_CROP_SCALE, hflip=0.5, color_jitter=None,
                                         auto_augment=auto_augment or None, interpolation=preprocess.interpolation,
                                         mean=tuple(preprocess.mean), std=tuple(preprocess.std), re_prob=re_prob,
                                         re_mode="pixel")
    except (AssertionError, KeyError, ValueError, IndexError) as e:  # timm's parsing of the policy string
        raise UserError(f"data.auto_augment: timm cannot parse '{auto_augment}' ({type(e).__name__}: {e}); e.g. "
                        "rand-m9-mstd0.5-inc1 (RandAugment), original (AutoAugment), augmix-m5-w4-d2") from None
    for op in _policy_ops(timm_transform):
        if getattr(op, "aug_fn", None) is _timm_posterize():
            op.aug_fn = _posterize_at_least_1_bit
    return v2.Compose([_PIL(), timm_transform])


def _timm_posterize():
    from timm.data import auto_augment

    return auto_augment.posterize


def _policy_ops(transform) -> list:
    """The AugmentOps of timm's policies inside `transform` (RandAugment, AugMix: .ops; AutoAugment: .policy)."""
    found = []
    for t in getattr(transform, "transforms", []):
        found += list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            found += list(sub)
    return found


def _posterize_at_least_1_bit(img, bits_to_keep, **kwargs):
    """timm's posterize at full magnitude keeps 0 bits, which Pillow (>= 11) refuses with an error in the
    middle of training; 1 bit is the strongest posterize Pillow does."""
    return _timm_posterize()(img, max(1, int(bits_to_keep)), **kwargs)


class _PIL:
    """Tensor images (synthetic, digits) as PIL images, which timm's policies operate on."""

    def __call__(self, image):
        return v2.functional.to_pil_image(image) if isinstance(image, torch.Tensor) else image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the photo is meant to be seen: EXIF orientation applied, and 16/32-bit integer or float
    grey scaled to 8 bits (PIL's convert("RGB") clips them, so a 16-bit PNG comes out almost white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # floats in [0, 1] or in [0, 255]
        else:  # integer grey: 16-bit unless every value fits 8 bits
            top = 255.0 if values.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")
