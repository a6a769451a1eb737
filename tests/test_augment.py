"""Augmentation and regularisation through timm's and torchvision's factories: RandAugment and random
erasing are a pure function of (seed, epoch, sample) like the default crops, MixUp / CutMix resume
exactly, stochastic depth reaches timm's blocks, and bad values are refused."""

import random

import numpy as np
import pytest
import torch
from test_resume import load
from tiny_runs import (
    QUIET,
    TINY,
    compose_cfg,
    run_cli,
)
from torchvision.transforms import v2

from finetune.commands.train import train
from finetune.data import datasets, sampling, transforms
from finetune.engine.signals import Interrupted
from finetune.engine.step import batch_mix
from finetune.models.build import build_model
from finetune.models.weights import Preprocess

PRE = Preprocess((0.5,) * 3, (0.5,) * 3, 32, "bilinear", 0.875)


def dataset(**options):
    base = datasets._synthetic_splits(compose_cfg("data.image_size=32").data, 32)[0]
    transform = transforms.train_transform(32, PRE, True, **options)
    return sampling.TransformedDataset(base, transform, seed=3)


def test_default_pipeline_is_unchanged_without_timm_options():
    default = repr(transforms.train_transform(32, PRE, True))
    assert "RandomResizedCrop(" in default and "timm" not in default and "RandAugment" not in default
    assert "RandAugment" in repr(transforms.train_transform(32, PRE, True, "rand-m9-mstd0.5-inc1"))


def test_randaugment_and_erasing_are_a_function_of_seed_epoch_and_sample():
    ds = dataset(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, again = ds[(5, 2)][0], ds[(5, 2)][0]
    assert torch.equal(a, again)  # the same key, the same image, whatever was drawn in between
    assert not torch.equal(a, ds[(5, 3)][0])  # another epoch, another augmentation
    # the caller's Python, NumPy and torch generators are left as they were
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "rand-m10-mstd0", "original", "augmix-m10-w3-d2"])
def test_timm_policies_at_full_magnitude_never_fail(policy):
    # at magnitude 10 the increasing posterize keeps 0 bits, which Pillow refuses: finetune keeps 1
    ds = dataset(auto_augment=policy)
    for i in range(40):
        assert ds[(i % 8, i)][0].shape == (3, 32, 32)


def test_random_erasing_erases():
    plain, erased = dataset(re_prob=0.0 + 1e-9), dataset(re_prob=1.0)
    # same crops (drawn before erasing), then a region replaced by noise
    a, b = plain[(0, 0)][0], erased[(0, 0)][0]
    changed = (a != b).any(0).float().mean()
    assert 0.01 < changed < 0.5


def test_mixup_and_cutmix_mix_and_resume_exactly(tmp_path):
    mix = batch_mix(compose_cfg("data.mixup=0.4", "data.cutmix=1.0").data, num_classes=2)
    assert isinstance(mix, v2.RandomChoice)
    torch.manual_seed(0)  # one draw may leave the batch as it is (a CutMix box clipped to nothing), so 10
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    draws = [mix(x, y) for _ in range(10)]
    assert all(soft.shape == (4, 2) and torch.allclose(soft.sum(1), torch.ones(4)) for _, soft in draws)
    assert sum(not torch.equal(mixed, x) for mixed, _ in draws) >= 5
    plan = ["experiment=full", "epochs=2", "data.mixup=0.4", "data.cutmix=1.0", "model.drop_rate=0.2"]
    train(compose_cfg(*plan), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(compose_cfg(*plan), tmp_path / "first", stop_at_step=4)  # mid-epoch 1
    train(compose_cfg(*plan, f"resume={tmp_path / 'first'}"), tmp_path / "second")
    a, b = load(tmp_path / "straight"), load(tmp_path / "second")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    plain = train(compose_cfg("experiment=full", "epochs=2", "model.drop_rate=0.2"), tmp_path / "plain")
    c = load(tmp_path / "plain")
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # the mixing trained
    assert plain["final_val_acc"] is not None


def test_drop_path_reaches_timm_blocks_and_is_refused_elsewhere(capsys, tmp_path):
    cfg = compose_cfg("model=timm", "model.name=resnet10t", "model.weights=null", "model.drop_path_rate=0.1").model
    model = build_model(cfg, 2).model
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
    code, err = run_cli(capsys, "train", *TINY, "model.drop_path_rate=0.1", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err[-1] == ("finetune: error: model.drop_path_rate: stochastic depth is set through timm's "
                                     "models only (model.source=timm)")


@pytest.mark.parametrize("override, message", [
    ("data.auto_augment=bogus", "data.auto_augment: timm cannot parse 'bogus'"),
    ("data.re_prob=2", "data.re_prob: the random-erasing probability must be in [0, 1], got 2.0"),
    ("data.mixup=-1", "data.mixup: the Beta distribution's alpha must be >= 0 (0: off), got -1.0"),
])
def test_bad_values(capsys, tmp_path, override, message):
    code, err = run_cli(capsys, "train", *TINY, override, *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err[-1].startswith(f"finetune: error: {message}")
