"""Draft decoding (data.draft) and the resized copy (data.cache_resized): large JPEGs decoded at reduced
scale but never below what the transforms read, small images and other formats as always."""

import math
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune.data.images import load_rgb
from finetune.data.loaders import build_data
from finetune.data.resized import cache_resized
from finetune.data.transforms import TRAIN_CROP_SCALE
from finetune.models.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def photo(path, size=(1600, 1200), fmt="JPEG"):
    """A smooth colour gradient with some texture, as a camera JPEG would hold."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    img = np.stack([x, y, (np.sin(20 * x) * np.cos(15 * y) + 1) / 2], -1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path, format=fmt, quality=90)
    return path


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_short_side(tmp_path):
    path = photo(tmp_path / "a.jpg")
    assert load_rgb(path).size == (1600, 1200)
    assert load_rgb(path, 300).size == (400, 300)  # 1/4: 300 is exactly reached
    assert load_rgb(path, 301).size == (800, 600)  # 1/8 (150) and 1/4 (300) would be below 301
    assert load_rgb(path, 700).size == (1600, 1200)  # under 2x the side: a full decode
    # the reduced decode resized to a common size is the full decode resized, up to a low-pass difference
    full = np.asarray(load_rgb(path).resize((200, 150), Image.BILINEAR, reducing_gap=None), dtype=float)
    draft = np.asarray(load_rgb(path, 300).resize((200, 150), Image.BILINEAR, reducing_gap=None), dtype=float)
    assert np.abs(full - draft).mean() < 2.0
    png = photo(tmp_path / "a.png", fmt="PNG")  # only JPEG has a reduced-scale decode
    assert load_rgb(png, 300).size == (1600, 1200)


def imagefolder(root, size=(1600, 1200)):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                photo(root / split / name / f"{i}.jpg", size)
    return root


def data_cfg(root, **kw):
    return OmegaConf.create({"name": "imagefolder", "root": str(root), "image_size": 64, "augment": True,
                             "auto_augment": None, "re_prob": 0.0, "num_workers": 0, "skip_bad": False,
                             "draft": True, "cache_resized": False, "progress": False, **kw})


PRE = Preprocess(IMAGENET_MEAN, IMAGENET_STD, 64, "bilinear", 0.875)


@pytest.mark.parametrize("augment", [True, False])
def test_each_split_decodes_down_to_what_its_transform_reads(tmp_path, augment):
    data = build_data(data_cfg(imagefolder(tmp_path), augment=augment), PRE, batch_size=2, seed=0)
    eval_side = math.ceil(64 / 0.875)  # the eval resize: 74 px
    # a random crop keeps at least 35 % of the area: sqrt(0.35) of the side, which must still give 64 px
    train_side = math.ceil(64 / math.sqrt(TRAIN_CROP_SCALE[0])) if augment else eval_side
    assert (data.train.base.min_side, data.val.base.min_side) == (train_side, eval_side)
    assert next(iter(data.train_loader(0)))[0].shape == (2, 3, 64, 64)
    data = build_data(data_cfg(tmp_path, draft=False), PRE, batch_size=2, seed=0)
    assert (data.train.base.min_side, data.val.base.min_side) == (None, None)


def test_the_resized_copy_is_made_once_and_again_when_the_file_changes(tmp_path):
    root = imagefolder(tmp_path / "data")
    small = photo(root / "train" / "a" / "small.jpg", (80, 60))
    samples = [(str(p), 0) for p in sorted((root / "train" / "a").iterdir())]
    store = tmp_path / "store"
    copied, made = cache_resized(samples, 100, progress=False, root=store)
    assert made == 2 and (str(small), 0) in copied  # the small image is read where it is
    resized = [p for p, _ in copied if p != str(small)]
    assert all(p.startswith(str(store / "100")) and min(Image.open(p).size) == 100 for p in resized)
    again, made = cache_resized(samples, 100, progress=False, root=store)
    assert made == 0 and again == copied
    os.utime(samples[0][0], ns=(1, 1))  # a changed source: copied again, under another name
    changed, made = cache_resized(samples, 100, progress=False, root=store)
    assert made == 1 and changed[0] != copied[0] and changed[1:] == copied[1:]


def test_a_run_with_the_resized_copy_trains_on_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = imagefolder(tmp_path / "data")
    data = build_data(data_cfg(root, cache_resized=True), PRE, batch_size=2, seed=0)
    train_side = math.ceil(64 / math.sqrt(TRAIN_CROP_SCALE[0]))
    assert all(p.startswith(str(tmp_path / "cache" / "finetune" / "resized" / str(train_side)))
               for p, _ in data.train.base.samples)
    assert next(iter(data.train_loader(0)))[0].shape == (2, 3, 64, 64)
