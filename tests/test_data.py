"""Tests for finetune.data.loaders: sources, validation, transforms and deterministic loaders."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import shared_data
from PIL import Image

from finetune.base.errors import UserError
from finetune.config.schema import DataConfig
from finetune.data import datasets, images, sampling, transforms
from finetune.data import loaders as D

IMAGENET = SimpleNamespace(
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224, interpolation="bicubic", crop_pct=0.875
)


def small(**kw) -> DataConfig:
    """A small, fast synthetic config."""
    base = dict(name="synthetic", image_size=32, train_size=40, val_size=20, num_classes=4, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ----------------------------------------------------------------------------------------- names


def test_num_classes_per_source(tmp_path):
    assert datasets.num_classes(DataConfig(name="synthetic", num_classes=7)) == 7
    assert datasets.num_classes(DataConfig(name="cifar100")) == 100
    assert datasets.num_classes(DataConfig(name="Fashion-MNIST")) == 10
    assert datasets.num_classes(DataConfig(name="imagefolder", root=str(shared_data("hymenoptera")))) == 2


def test_unknown_name_and_bad_synthetic_sizes():
    with pytest.raises(UserError, match="unknown data.name 'imagenet'.*cifar10"):
        datasets.num_classes(DataConfig(name="imagenet"))
    with pytest.raises(UserError, match="data.num_classes must be at least 2"):
        datasets.num_classes(DataConfig(name="synthetic", num_classes=1))
    with pytest.raises(UserError, match="data.train_size"):
        D.build_data(small(train_size=0), IMAGENET, batch_size=4, seed=0)


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_disjoint():
    images, labels = datasets.synthetic_images(48, 4, 32, 0)
    datasets.synthetic_images.cache_clear()
    again, labels_again = datasets.synthetic_images(48, 4, 32, 0)
    assert again is not images and torch.equal(again, images) and torch.equal(labels_again, labels)
    assert images.shape == (48, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [12, 12, 12, 12]
    val, _ = datasets.synthetic_images(48, 4, 32, 1)
    flat_train, flat_val = images.flatten(1).float(), val.flatten(1).float()
    assert torch.cdist(flat_val, flat_train).min() > 100  # no val image repeats a train image
    # not a constant per class: samples of one class differ clearly
    cls0 = images[labels == 0].float()
    assert (cls0 - cls0.mean(0)).abs().mean() > 20


def test_synthetic_size_follows_weights_or_override():
    b = D.build_data(DataConfig(name="synthetic", train_size=8, val_size=4), replace_pp(input_size=48), batch_size=4, seed=0)
    assert b.train[0][0].shape == (3, 48, 48) and b.val[0][0].shape == (3, 48, 48)
    cfg = DataConfig(name="synthetic", train_size=8, val_size=4, image_size=40)
    b = D.build_data(cfg, replace_pp(input_size=48), batch_size=4, seed=0)
    assert b.train[0][0].shape == (3, 40, 40)
    assert b.classes == ["class_0", "class_1", "class_2", "class_3"] and b.num_workers == 0


def replace_pp(**kw):
    return SimpleNamespace(**{**vars(IMAGENET), **kw})


def test_synthetic_is_learnable_by_a_linear_model():
    """Logistic regression on 8x8 downsampled pixels beats chance (25%) by far on held-out val."""
    b = D.build_data(small(train_size=160, val_size=80, augment=False), IMAGENET, batch_size=160, seed=0)

    def features(loader):
        x, y = next(iter(loader))
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1), y

    xtr, ytr = features(b.train_loader(0))
    xva, yva = features(b.val_loader())
    torch.manual_seed(0)
    model = torch.nn.Linear(xtr.shape[1], 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    accuracy = (model(xva).argmax(1) == yva).float().mean().item()
    assert accuracy > 0.7


# ----------------------------------------------------------------------------------- determinism


def test_train_order_and_augmentation_depend_only_on_seed_epoch_index():
    cfg = small()
    first = D.build_data(cfg, IMAGENET, batch_size=8, seed=3)
    torch.manual_seed(123)  # global RNG state must not matter
    run_a = batches(first.train_loader(1))
    torch.manual_seed(999)
    datasets.synthetic_images.cache_clear()
    second = D.build_data(cfg, IMAGENET, batch_size=8, seed=3)
    run_b = batches(second.train_loader(1))
    assert same_batches(run_a, run_b)
    assert not same_batches(run_a, batches(second.train_loader(2)))  # a new epoch: new order and crops
    other_seed = D.build_data(cfg, IMAGENET, batch_size=8, seed=4)
    assert not same_batches(run_a, batches(other_seed.train_loader(1)))
    # same sample, same epoch -> same crop regardless of its position in the batch order
    assert torch.equal(first.train[(5, 1)][0], second.train[(5, 1)][0])
    assert not torch.equal(first.train[(5, 1)][0], first.train[(5, 2)][0])


def test_iterating_with_no_workers_leaves_global_rng_untouched():
    b = D.build_data(small(), IMAGENET, batch_size=8, seed=0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    batches(b.train_loader(0))
    batches(b.val_loader())
    assert torch.equal(state, torch.get_rng_state())


def test_workers_give_the_same_batches_as_the_main_process():
    zero = D.build_data(small(num_workers=0), IMAGENET, batch_size=8, seed=1)
    two = D.build_data(small(num_workers=2), IMAGENET, batch_size=8, seed=1, persistent_workers=True)
    assert two.num_workers == 2
    assert same_batches(batches(zero.train_loader(0)), batches(two.train_loader(0)))
    # persistent workers: the same loader object, re-pointed at the next epoch
    assert same_batches(batches(zero.train_loader(1)), batches(two.train_loader(1)))
    assert same_batches(batches(zero.val_loader()), batches(two.val_loader()))


def test_close_stops_persistent_workers():
    b = D.build_data(small(num_workers=2), IMAGENET, batch_size=8, seed=1, persistent_workers=True)
    batches(b.train_loader(0))
    workers = list(b.train_loader(0)._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    b.close()
    assert not any(w.is_alive() for w in workers)
    assert len(batches(b.train_loader(1))) == b.steps_per_epoch  # usable again after close


def test_start_step_resumes_mid_epoch():
    b = D.build_data(small(), IMAGENET, batch_size=8, seed=0)
    full = batches(b.train_loader(2))
    tail = batches(b.train_loader(2, start_step=3))
    assert len(full) == b.steps_per_epoch == 5 and same_batches(full[3:], tail)
    assert len(b.train_loader(2, start_step=1)) == 4


def test_drop_last_only_when_there_is_more_than_one_batch():
    b = D.build_data(small(train_size=10), IMAGENET, batch_size=4, seed=0)
    sizes = [len(y) for _, y in b.train_loader(0)]
    assert b.steps_per_epoch == 2 == len(b.train_loader(0)) and sizes == [4, 4]
    b = D.build_data(small(train_size=3), IMAGENET, batch_size=4, seed=0)
    assert b.steps_per_epoch == 1 and [len(y) for _, y in b.train_loader(0)] == [3]
    # every sample appears exactly once per epoch otherwise
    b = D.build_data(small(train_size=12), IMAGENET, batch_size=4, seed=0)
    sampler = sampling.EpochSampler(12, seed=0, batch_size=4)
    sampler.set_epoch(5)
    assert sorted(i for i, _ in sampler) == list(range(12))


def test_val_loader_is_sequential_with_double_batch_and_eval_transform():
    b = D.build_data(small(val_size=20), IMAGENET, batch_size=4, seed=0)
    got = batches(b.val_loader())
    assert [len(y) for _, y in got] == [8, 8, 4]
    _, labels = datasets.synthetic_images(20, 4, 32, 1)
    assert torch.equal(torch.cat([y for _, y in got]), labels)
    assert torch.equal(got[0][0][0], b.val[0][0])


# ------------------------------------------------------------------------------------ transforms


def test_eval_transform_resizes_crops_and_normalises():
    t = transforms.eval_transform(32, IMAGENET)
    mean_colour = np.array(IMAGENET.mean) * 255
    image = Image.fromarray(np.broadcast_to(mean_colour.round().astype(np.uint8), (50, 80, 3)).copy())
    out = t(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the mean colour normalises to ~0
    names = [type(s).__name__ for s in t.transforms]
    assert names == ["ToImage", "Resize", "CenterCrop", "ToDtype", "Normalize"]
    assert t.transforms[1].size == [36]  # floor(32 / 0.875)


def test_train_transform_augments_only_when_asked():
    aug = transforms.train_transform(32, IMAGENET, augment=True)
    crop = aug.transforms[1]
    assert type(crop).__name__ == "RandomResizedCrop" and crop.scale == transforms.TRAIN_CROP_SCALE
    assert crop.interpolation.value == "bicubic"
    plain = transforms.train_transform(32, IMAGENET, augment=False)
    eval_steps = transforms.eval_transform(32, IMAGENET).transforms
    assert [type(s).__name__ for s in plain.transforms] == [type(s).__name__ for s in eval_steps]
    b = D.build_data(small(augment=False), IMAGENET, batch_size=4, seed=0)
    assert torch.equal(b.train[(0, 0)][0], b.train[(0, 9)][0])  # no randomness left


def test_bad_interpolation_is_a_user_error():
    with pytest.raises(UserError, match="unknown interpolation 'cubic'"):
        transforms.eval_transform(32, replace_pp(interpolation="cubic"))


def test_resolve_workers():
    assert D.resolve_workers(3, in_memory=True) == 3
    assert D.resolve_workers(-1, in_memory=True) == 0
    cores = len(os.sched_getaffinity(0))
    assert D.resolve_workers(-1, in_memory=False) == max(0, min(8, cores - 1))
    with pytest.raises(UserError, match="data.num_workers"):
        D.resolve_workers(-2, in_memory=False)


# ----------------------------------------------------------------------------------- imagefolder


def test_hymenoptera_imagefolder():
    cfg = DataConfig(name="imagefolder", root=str(shared_data("hymenoptera")), image_size=32, num_workers=0)
    b = D.build_data(cfg, IMAGENET, batch_size=16, seed=0)
    assert (len(b.train), len(b.val), b.classes, b.skipped) == (245, 153, ["ants", "bees"], 0)
    labels = [label for _, label in b.val.base.samples]
    assert labels.count(0) == 70 and labels.count(1) == 83
    # the one palette-mode image loads as 3 channels
    palette = next(i for i, (p, _) in enumerate(b.train.base.samples + b.val.base.samples) if Image.open(p).mode == "P")
    split, index = (b.train, palette) if palette < len(b.train) else (b.val, palette - len(b.train))
    assert split[index][0].shape == (3, 32, 32)
    x, y = next(iter(b.train_loader(0)))
    assert x.shape == (16, 3, 32, 32) and set(y.tolist()) <= {0, 1}


def write_image(path, colour=(200, 30, 30), size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_folder(root, layout: dict[str, dict[str, int]]):
    """layout: {split: {class: number of images}}"""
    for split, classes in layout.items():
        for name, count in classes.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                write_image(str(root / split / name / f"{i}.png" if i % 2 else root / split / name / f"{i}.jpg"))
    return root


def folder_cfg(root, **kw):
    return DataConfig(**{"name": "imagefolder", "root": str(root), "image_size": 16, "num_workers": 0, **kw})


def build(cfg, batch_size=2):
    return D.build_data(cfg, IMAGENET, batch_size=batch_size, seed=0)


def test_tiny_imagefolder_with_grayscale_and_hidden_folders(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    os.makedirs(root / "train" / ".ipynb_checkpoints")
    Image.new("L", (9, 9), 128).save(root / "train" / "dog" / "gray.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    b = build(folder_cfg(root))
    assert b.classes == ["cat", "dog"] and len(b.train) == 6 and len(b.val) == 2
    gray = next(i for i, (p, _) in enumerate(b.train.base.samples) if p.endswith("gray.png"))
    assert b.train[gray][0].shape == (3, 16, 16)


def no_val(root):
    return make_folder(root, {"train": {"a": 1}})


def val_without_classes(root):
    make_folder(root, {"train": {"a": 1}})
    os.makedirs(root / "val")
    return root


def empty_class(root):
    return make_folder(root, {"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}})


def mismatched_classes(root):
    return make_folder(root, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "d": 1}})


@pytest.mark.parametrize(
    "setup, message, found_without_scanning",
    [
        (lambda r: None, "data.root is required", True),
        (lambda r: r / "nowhere", "does not exist", True),
        (no_val, "has no 'val' folder", True),
        (val_without_classes, "val' has no class folders", True),
        (empty_class, r"class folder '.*train/b' has no readable images", False),
        (mismatched_classes, r"different classes: only in train: \['b', 'c'\]; only in val: \['d'\]", True),
    ],
)
def test_imagefolder_layout_errors(tmp_path, setup, message, found_without_scanning):
    root = setup(tmp_path)
    cfg = DataConfig(name="imagefolder", root=None if root is None else str(root), image_size=16)
    with pytest.raises(UserError, match=message):
        build(cfg)
    if found_without_scanning:  # num_classes checks the layout, not the files
        with pytest.raises(UserError, match=message):
            datasets.num_classes(cfg)


def test_corrupt_image_is_named_or_skipped(tmp_path, caplog):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="cannot read image '.*broken.jpg'.*skip_bad"):
        build(folder_cfg(root))
    with caplog.at_level(logging.WARNING, logger="finetune.data.datasets"):
        b = build(folder_cfg(root, skip_bad=True))
    assert b.skipped == 1 and len(b.train) == 4
    assert "skipped 1 unreadable images" in caplog.text


def test_truncated_jpeg_passes_the_header_check():
    """Why load-time detection is needed at all: verify() cannot see cut-off pixel data."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    path = f"/tmp/finetune-test-cut-{os.getpid()}.jpg"
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * 0.8)])
    try:
        assert datasets._readable(path)
        with pytest.raises(OSError):
            images.load_rgb(path)
    finally:
        os.remove(path)


def test_unreadable_image_found_at_load_time_in_a_worker_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "VERIFY_MAX_FILES", 0)  # a large data set: no up-front check, errors surface in workers
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "cut.jpg").write_bytes(b"\xff\xd8 garbage")
    b = build(folder_cfg(root, num_workers=1), batch_size=8)
    with pytest.raises(UserError) as info:
        batches(b.train_loader(0))
    assert "cut.jpg" in str(info.value) and "\n" not in str(info.value)  # the one-line message, not a traceback
    assert str(info.value).startswith("cannot read image")
    # skip_bad: the broken sample is replaced by the next readable one, deterministically
    b = build(folder_cfg(root, skip_bad=True, augment=False), batch_size=8)
    samples = b.train.base.samples
    index = next(i for i, (p, _) in enumerate(samples) if p.endswith("cut.jpg"))
    assert torch.equal(b.train[index][0], b.train[(index + 1) % len(samples)][0])
    assert len(batches(b.train_loader(0))[0][1]) == 5


# ----------------------------------------------------------------------------------- torchvision


def write_fake_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        entry = {"data": pixels, "labels": [(i + j) % 10 for j in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)


@pytest.fixture
def no_md5(monkeypatch):
    """The fake files cannot match torchvision's md5 sums: accept any file that exists."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_fake_cifar10(tmp_path, no_md5):
    write_fake_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False, image_size=24, num_workers=0)
    b = build(cfg, batch_size=4)
    assert (len(b.train), len(b.val)) == (20, 4)
    assert b.classes[:3] == ["airplane", "automobile", "bird"] and b.num_classes == 10
    x, y = next(iter(b.val_loader()))
    assert x.shape == (4, 3, 24, 24) and y.tolist() == [5, 6, 7, 8]


def write_idx(path, array: np.ndarray):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes())


def test_fake_mnist_is_converted_to_three_channels(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 77, dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    b = build(DataConfig(name="mnist", root=str(tmp_path), download=False, image_size=20, num_workers=0))
    image, label = b.val[1]
    assert image.shape == (3, 20, 20) and label == 1
    assert torch.allclose(image[0] * IMAGENET.std[0] + IMAGENET.mean[0], torch.tensor(77 / 255), atol=1e-3)


def test_offline_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    root = tmp_path / "store"
    expected = f"cifar10 is not in '{root}' and the download failed.*copy torchvision's CIFAR10"
    with pytest.raises(UserError, match=expected):
        build(DataConfig(name="cifar10", root=str(root), download=True))
    with pytest.raises(UserError, match="data.download is false"):
        build(DataConfig(name="cifar100", root=str(root), download=False))


def test_default_root_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=f"'{tmp_path}/.cache/finetune/data'"):
        build(DataConfig(name="svhn", download=False))
    assert not os.path.exists(tmp_path / ".cache")  # nothing created when not downloading


def test_augmentation_seeds_leave_every_cuda_generator_alone(monkeypatch):
    """Each sample's augmentation is seeded on the CPU generator only: torch.manual_seed would also reseed
    every CUDA device's generator (dropout on the GPU would then follow the data order)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    bundle = D.build_data(small(), IMAGENET, batch_size=8, seed=3)
    first = [bundle.train[(i, 0)][0] for i in range(4)]
    assert calls == []
    again = [bundle.train[(i, 0)][0] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # still a function of (seed, epoch, index)


def test_embedded_digits_are_a_fixed_real_split():
    cfg = DataConfig(name="digits", image_size=32, num_workers=0)
    assert datasets.num_classes(cfg) == 10
    bundle = D.build_data(cfg, IMAGENET, batch_size=32, seed=0)
    assert (len(bundle.train), len(bundle.val)) == (300, 500) and bundle.classes == [str(d) for d in range(10)]
    labels = [bundle.train.base[i][1] for i in range(300)]
    assert np.bincount(labels).tolist() == [30] * 10
    train_pixels = {np.asarray(im).tobytes() for im, _ in datasets.digits_split("train")}
    val_pixels = {np.asarray(im).tobytes() for im, _ in datasets.digits_split("val")}
    assert not train_pixels & val_pixels  # no image in both splits
    image = bundle.train.base[0][0]
    assert image.size == (32, 32) and np.asarray(image).std() > 20  # real strokes, not a blank
