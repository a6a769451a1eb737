"""A set of labels per image (tags, attributes, findings): one sigmoid per label, binary cross-entropy, and
the metrics multi-label work is judged by: mAP (the mean over labels of each label's average precision, the
standard multi-label metric, threshold-free), macro and micro F1 at per-label thresholds, label accuracy.

Each evaluation of the delivered model chooses every label's threshold on the val set (the one that
maximises that label's F1); the task keeps them, checkpoints and exports carry them, and `finetune eval`
and `predict` use them as stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.base.errors import UserError
from finetune.tasks.base import GatherFn, Meter, SumFn, Task

DEFAULT_THRESHOLD = 0.5


def average_precisions(probs: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """Each label's average precision (torchmetrics'); None for a label without a positive image, whose AP
    is undefined (mAP averages over the others)."""
    import warnings

    from torchmetrics.functional.classification import multilabel_average_precision

    with warnings.catch_warnings():  # a label without a positive: its AP is left out below, not "recall 1"
        warnings.filterwarnings("ignore", message="No positive samples found")
        per_label = multilabel_average_precision(probs, targets.long(), num_labels=targets.shape[1], average=None)
    positives = targets.sum(0) > 0
    return [float(ap) if has else None for ap, has in zip(per_label.tolist(), positives.tolist())]


def f1_counts(predicted: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true positives, false positives, false negatives) per label of 0/1 predictions. Written here, not
    torchmetrics': its multi-label F1 takes one threshold for every label, these are per label."""
    predicted, targets = predicted.bool(), targets.bool()
    return ((predicted & targets).sum(0).double(), (predicted & ~targets).sum(0).double(),
            (~predicted & targets).sum(0).double())


def f1_scores(predicted: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float, float]:
    """(per-label F1, macro F1, micro F1); a label with no positive and no predicted positive scores 1."""
    tp, fp, fn = f1_counts(predicted, targets)
    denominator = 2 * tp + fp + fn
    per_label = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.ones_like(tp))
    micro = float(2 * tp.sum() / max(1.0, float(denominator.sum())))
    return per_label.tolist(), float(per_label.mean()), micro


def best_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the threshold that maximises its F1 on these images: each label's probabilities sorted,
    the F1 of predicting the top k positive for every k, the midpoint between the k-th and the next
    probability (ties broken towards fewer positives); 0.5 for a label without a positive image."""
    out = []
    for j in range(probs.shape[1]):
        p, y = probs[:, j].double(), targets[:, j].double()
        positives = float(y.sum())
        if positives == 0:
            out.append(DEFAULT_THRESHOLD)
            continue
        order = torch.argsort(p, descending=True)
        p, y = p[order], y[order]
        tp = torch.cumsum(y, 0)
        k = torch.arange(1, len(p) + 1, dtype=torch.float64)
        f1 = 2 * tp / (k + positives)
        best = int(torch.argmax(f1))  # the first maximum: the fewest positives
        below = float(p[best + 1]) if best + 1 < len(p) else 0.0
        out.append(round((float(p[best]) + below) / 2, 6))
    return out


class _Meter(Meter):
    def __init__(self, task: "MultiLabel", device: torch.device, tune: bool):
        self.task, self.device, self.tune = task, device, tune
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0

    def update(self, logits, targets):
        targets = targets.float()
        self.loss_sum += F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum").double()
        self.count += targets.numel()
        self.probs.append(torch.sigmoid(logits.float()).cpu())
        self.targets.append(targets.cpu())

    def result(self, sum_: SumFn, gather: GatherFn) -> dict[str, float]:
        loss_sum, count = sum_(torch.stack([self.loss_sum, torch.tensor(float(self.count), device=self.device,
                                                                         dtype=torch.float64)])).tolist()
        parts = gather((torch.cat(self.probs) if self.probs else torch.empty(0, self.task.num_labels),
                        torch.cat(self.targets) if self.targets else torch.empty(0, self.task.num_labels)))
        probs, targets = torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])
        if self.tune:  # the delivered model's evaluation: its thresholds, chosen on these images
            self.task.thresholds = best_thresholds(probs, targets)
        figures = self.task.figures(probs, targets)
        return {"loss": loss_sum / max(1.0, count), **{k: figures[k] for k in self.task.metrics}}


class MultiLabel(Task):
    name = "multilabel"
    metrics = ("map", "f1_macro", "f1_micro", "acc")
    main = "map"
    train_metric = "acc"  # label accuracy at 0.5: the share of (image, label) decisions that are right

    def __init__(self, num_labels: int, thresholds: list[float] | None = None):
        self.num_labels = num_labels
        self.thresholds = list(thresholds) if thresholds else [DEFAULT_THRESHOLD] * num_labels

    @classmethod
    def from_config(cls, cfg, num_labels: int, class_counts: list[int] | None = None) -> "MultiLabel":
        loss = cfg.get("loss") or {}
        if loss.get("class_weights", "none") not in (None, "none") or float(loss.get("logit_adjust", 0) or 0):
            raise UserError("loss.class_weights and loss.logit_adjust are for single-label tasks; task multilabel "
                            "weighs every label alike")
        return cls(num_labels)

    def loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets.float())

    def plain_loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def train_score(self, logits, labels):
        return ((logits > 0) == labels.bool()).double().mean(1).sum()

    def meter(self, device, tune: bool = True):
        return _Meter(self, device, tune)

    def probabilities(self, logits):
        return torch.sigmoid(logits.float())

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 per label at each label's threshold."""
        return probs >= torch.tensor(self.thresholds, dtype=probs.dtype)

    def figures(self, probs: torch.Tensor, targets: torch.Tensor) -> dict:
        """Every figure of these probabilities against the targets, at the task's thresholds: map, f1_macro,
        f1_micro, acc, and per label ap and f1."""
        aps = average_precisions(probs, targets)
        known = [a for a in aps if a is not None]
        predicted = self.predict(probs)
        per_label_f1, macro, micro = f1_scores(predicted, targets)
        return {"map": sum(known) / len(known) if known else float("nan"), "f1_macro": macro, "f1_micro": micro,
                "acc": float((predicted == targets.bool()).double().mean()) if len(targets) else float("nan"),
                "ap": aps, "f1": per_label_f1}

    def per_image_loss(self, probs, targets):
        return F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), targets.float(), reduction="none").mean(1)

    def report(self, probs, targets, classes):
        """Loss, mAP, macro and micro F1 and label accuracy at the stored thresholds, and per label its AP,
        F1, precision, recall, support and threshold."""
        figures = self.figures(probs, targets.float())
        tp, fp, fn = f1_counts(self.predict(probs), targets)
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        support = targets.sum(0)
        return {"images": len(targets), "loss": float(self.per_image_loss(probs, targets).mean()),
                **{k: figures[k] for k in self.metrics},
                "per_label": [{"label": c, "ap": figures["ap"][i], "f1": figures["f1"][i],
                               "precision": float(precision[i]), "recall": float(recall[i]),
                               "support": int(support[i]), "threshold": self.thresholds[i]}
                              for i, c in enumerate(classes)]}

    def label_buffer(self, n):
        return torch.empty(n, self.num_labels, dtype=torch.float32)

    def state(self) -> dict:
        return {"task": self.name, "main": self.main, "thresholds": list(self.thresholds)}

    def load_state(self, state):
        if state and state.get("thresholds"):
            self.thresholds = list(state["thresholds"])
