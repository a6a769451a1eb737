"""Small builders shared by the tests: a config, a 6-group toy CNN, a Trainer around a model, and a
reader for the CSV reports."""

from __future__ import annotations

import csv

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from finetune.config.schema import TrainConfig
from finetune.core.groups import build_groups
from finetune.engine.step import Trainer

# what a config group file sets on the command line's config; the tests' own choice: a timm model on
# generated data
GROUPS = {"model.name": "tf_efficientnet_lite0", "data.name": "synthetic"}


def make_cfg(**overrides):
    """The schema's defaults with dotted overrides, e.g. make_cfg(**{"schedule.kind": "cosine"})."""
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in GROUPS.items():
        OmegaConf.update(cfg, key, value)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=False)
    return cfg


class SixGroupNet(nn.Module):
    """stem, b1..b4, head: six groups by auto grouping, with BatchNorm in every non-head group."""

    def __init__(self, classes: int = 3):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(3, 8, 1)
        self.b1, self.b2, self.b3, self.b4 = block(8, 8, 2), block(8, 8, 1), block(8, 16, 2), block(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.b4(self.b3(self.b2(self.b1(self.stem(x)))))
        return self.head(self.pool(x).flatten(1))


def make_trainer(model: nn.Module, cfg, steps_per_epoch: int, spec=None):
    return Trainer.from_config(cfg, model, build_groups(model, spec), steps_per_epoch, torch.device("cpu"))


def batches(n: int, size: int = 8, image: int = 16, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, image, image, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def read_csv(path) -> list[dict]:
    """A run's CSV report (metrics.csv, lr_trace.csv) as a list of row dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))
