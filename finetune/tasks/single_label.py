"""One class per image: softmax over the classes, cross-entropy (label smoothing as configured), accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.tasks.base import GatherFn, Meter, SumFn, Task


class _Meter(Meter):
    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0

    def update(self, logits, targets):
        self.loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        self.correct += (logits.argmax(1) == targets).sum()
        self.count += targets.numel()

    def result(self, sum_: SumFn, gather: GatherFn) -> dict[str, float]:
        loss_sum, correct, count = sum_(torch.stack([self.loss_sum.double(), self.correct.double(),
                                                     torch.tensor(float(self.count), device=self.device)])).tolist()
        return {"loss": loss_sum / max(1, count), "acc": correct / max(1, count)}


class SingleLabel(Task):
    name = "single_label"
    metrics = ("acc",)
    main = "acc"
    train_metric = "acc"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    @classmethod
    def from_config(cls, cfg, num_labels: int) -> "SingleLabel":
        return cls(num_labels, float(cfg.label_smoothing))

    def loss(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def plain_loss(self, logits, targets):
        return F.cross_entropy(logits.float(), targets)

    def train_score(self, logits, labels):
        return (logits.argmax(1) == labels).sum()

    def meter(self, device, tune: bool = True):
        return _Meter(device)

    def probabilities(self, logits):
        return torch.softmax(logits.float(), dim=1)

    def label_buffer(self, n):
        return torch.empty(n, dtype=torch.long)
