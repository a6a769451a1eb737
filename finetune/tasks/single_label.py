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

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """The class index of each image: the most probable."""
        return probs.argmax(1)

    def per_image_loss(self, probs, targets):
        return F.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="none")

    def report(self, probs, targets, classes):
        """Loss, accuracy, top-5 (more than 5 classes), per-class precision, recall, F1 and support, macro F1
        over the classes the split holds, the confusion matrix (torchmetrics)."""
        from torchmetrics.functional.classification import (
            multiclass_accuracy,
            multiclass_confusion_matrix,
            multiclass_f1_score,
            multiclass_precision,
            multiclass_recall,
        )

        k, p, t = len(classes), probs, targets
        out = {"images": len(t), "loss": float(self.per_image_loss(p, t).mean()),
               "accuracy": float(multiclass_accuracy(p, t, num_classes=k, average="micro"))}
        if k > 5:
            out["top5_accuracy"] = float(multiclass_accuracy(p, t, num_classes=k, average="micro", top_k=5))
        per = {"precision": multiclass_precision(p, t, num_classes=k, average=None),
               "recall": multiclass_recall(p, t, num_classes=k, average=None),
               "f1": multiclass_f1_score(p, t, num_classes=k, average=None)}
        support = torch.bincount(t, minlength=k)
        out["per_class"] = [{"class": c, **{m: float(v[i]) for m, v in per.items()}, "support": int(support[i])}
                            for i, c in enumerate(classes)]
        present = support > 0  # macro averages over the classes the split holds
        out["macro_f1"] = float(per["f1"][present].mean())
        out["confusion_matrix"] = multiclass_confusion_matrix(p, t, num_classes=k).tolist()
        return out

    def label_buffer(self, n):
        return torch.empty(n, dtype=torch.long)
