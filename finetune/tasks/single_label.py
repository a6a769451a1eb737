"""One class per image: softmax over the classes, cross-entropy (label smoothing, class weights and logit
adjustment as configured), accuracy, balanced accuracy and macro F1 from a confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.base.errors import UserError
from finetune.tasks.base import GatherFn, Meter, SumFn, Task


def balanced_weights(counts: list[int]) -> list[float]:
    """sklearn's "balanced" class weights: n / (classes x count), so every class weighs as much in all."""
    n, k = sum(counts), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts]


def per_class(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class of a confusion matrix (rows: true, columns: predicted)."""
    confusion = confusion.double()
    tp, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def summary_of(confusion: torch.Tensor) -> dict[str, float]:
    """Balanced accuracy (the mean recall over the classes present) and macro F1 (over the same classes)."""
    rows = per_class(confusion)
    present = rows["support"] > 0
    if not bool(present.any()):
        return {"bal_acc": float("nan"), "f1_macro": float("nan")}
    return {"bal_acc": float(rows["recall"][present].mean()), "f1_macro": float(rows["f1"][present].mean())}


class _Meter(Meter):
    def __init__(self, task: "SingleLabel", device: torch.device, tune: bool):
        self.task, self.device, self.tune = task, device, tune
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0
        self.k = task.num_classes  # 0: not known until the first logits (a Trainer built without the data)
        self.confusion = torch.zeros(self.k * self.k, device=device, dtype=torch.long)

    def update(self, logits, targets):
        self.loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        predicted = logits.argmax(1)
        self.correct += (predicted == targets).sum()
        self.count += targets.numel()
        if not self.k:
            self.k = logits.shape[1]
            self.confusion = torch.zeros(self.k * self.k, device=self.device, dtype=torch.long)
        self.confusion += torch.bincount(targets * self.k + predicted, minlength=self.k * self.k)

    def result(self, sum_: SumFn, gather: GatherFn) -> dict[str, float]:
        loss_sum, correct, count = sum_(torch.stack([self.loss_sum.double(), self.correct.double(),
                                                     torch.tensor(float(self.count), device=self.device)])).tolist()
        k = self.k
        confusion = sum_(self.confusion.double()).round().long().cpu().view(k, k)
        if self.tune:  # the delivered model's: the run's per-class report comes from it
            self.task.confusion = confusion
        return {"loss": loss_sum / max(1, count), "acc": correct / max(1, count), **summary_of(confusion)}


class SingleLabel(Task):
    name = "single_label"
    metrics = ("acc", "bal_acc", "f1_macro")
    main = "acc"
    train_metric = "acc"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, class_weights: list[float] | None = None,
                 logit_shift: list[float] | None = None):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        # the training loss only: what it weighs and adds; evaluation measures the plain cross-entropy
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.logit_shift = torch.tensor(logit_shift, dtype=torch.float32) if logit_shift else None
        self.confusion: torch.Tensor | None = None  # of the last evaluation of the delivered model

    @classmethod
    def from_config(cls, cfg, num_labels: int, class_counts: list[int] | None = None) -> "SingleLabel":
        loss = cfg.get("loss") or {}
        weights = loss.get("class_weights", "none")
        tau = float(loss.get("logit_adjust", 0.0) or 0.0)
        if (weights not in (None, "none") or tau) and class_counts is None:
            raise UserError("loss.class_weights and loss.logit_adjust need the train set's class counts, which this "
                            "data set cannot give without reading every image")
        if weights in (None, "none"):
            chosen = None
        elif weights == "balanced":
            chosen = balanced_weights(class_counts)
        elif isinstance(weights, str):
            raise UserError(f"loss.class_weights: '{weights}' is not none, balanced or a list of weights")
        else:
            chosen = [float(w) for w in weights]
            if len(chosen) != num_labels or any(w < 0 for w in chosen):
                raise UserError(f"loss.class_weights: {len(chosen)} weights for {num_labels} classes; give one weight "
                                ">= 0 per class, in the classes' order")
        shift = None
        if tau:
            if tau < 0:
                raise UserError(f"loss.logit_adjust must be >= 0, got {tau}")
            n = sum(class_counts)
            shift = [tau * float(torch.log(torch.tensor(max(c, 1) / n))) for c in class_counts]
        return cls(num_labels, float(cfg.label_smoothing), chosen, shift)

    def loss(self, logits, targets):
        if self.logit_shift is not None:
            logits = logits + self.logit_shift.to(logits.device, logits.dtype)
        weight = self.class_weights.to(logits.device, logits.dtype) if self.class_weights is not None else None
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)

    @property
    def plain_differs(self) -> bool:
        """The training loss is not the plain one (smoothing, weights, adjustment): report the plain one."""
        return bool(self.label_smoothing) or self.class_weights is not None or self.logit_shift is not None

    def plain_loss(self, logits, targets):
        return F.cross_entropy(logits.float(), targets)

    def train_score(self, logits, labels):
        return (logits.argmax(1) == labels).sum()

    def confusion_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The confusion matrix (rows: true, columns: predicted) of a batch's logits."""
        k = logits.shape[1]
        return torch.bincount(labels * k + logits.argmax(1), minlength=k * k).view(k, k)

    def meter(self, device, tune: bool = True):
        return _Meter(self, device, tune)

    def probabilities(self, logits):
        return torch.softmax(logits.float(), dim=1)

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """The class index of each image: the most probable."""
        return probs.argmax(1)

    def per_image_loss(self, probs, targets):
        return F.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="none")

    def class_rows(self, classes: list[str], confusion: torch.Tensor | None = None) -> list[dict]:
        """Per class: precision, recall, F1, support (of `confusion`, else the last evaluation's)."""
        confusion = self.confusion if confusion is None else confusion
        rows = per_class(confusion)
        return [{"class": c, **{m: float(rows[m][i]) for m in ("precision", "recall", "f1")},
                 "support": int(rows["support"][i])} for i, c in enumerate(classes)]

    def report(self, probs, targets, classes):
        """Loss, accuracy, top-5 (more than 5 classes), balanced accuracy, per-class precision, recall, F1 and
        support, macro F1 over the classes the split holds, the confusion matrix."""
        from torchmetrics.functional.classification import (
            multiclass_accuracy,
            multiclass_confusion_matrix,
        )

        k, p, t = len(classes), probs, targets
        confusion = multiclass_confusion_matrix(p, t, num_classes=k)
        out = {"images": len(t), "loss": float(self.per_image_loss(p, t).mean()),
               "accuracy": float(multiclass_accuracy(p, t, num_classes=k, average="micro"))}
        if k > 5:
            out["top5_accuracy"] = float(multiclass_accuracy(p, t, num_classes=k, average="micro", top_k=5))
        figures = summary_of(confusion)
        out["balanced_accuracy"] = figures["bal_acc"]
        out["per_class"] = self.class_rows(classes, confusion)
        out["macro_f1"] = figures["f1_macro"]
        out["confusion_matrix"] = confusion.tolist()
        return out

    def label_buffer(self, n):
        return torch.empty(n, dtype=torch.long)
