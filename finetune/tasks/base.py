"""The Task interface every kind of task implements, and the running evaluation it keeps (a Meter)."""

from __future__ import annotations

from typing import Callable

import torch

# the reducers a meter's result needs across processes: a float64 tensor summed over ranks, and a
# picklable object gathered from every rank (one process: the identity and [obj])
SumFn = Callable[[torch.Tensor], torch.Tensor]
GatherFn = Callable[[object], list]


class Meter:
    """An evaluation in progress: `update` per batch (logits, targets), `result` at the end: {metric: value},
    "loss" included, over every process's share of the data."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self, sum_: SumFn, gather: GatherFn) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """One kind of task. `metrics`: what an evaluation reports besides "loss" (val_<name> in metrics.csv),
    `main`: the one best.pt and early stopping follow by default, `train_metric`: what training counts per
    batch (train_<name>); every metric is better higher, the losses lower."""

    name = ""
    metrics: tuple[str, ...] = ()
    main = ""
    train_metric = ""

    @classmethod
    def from_config(cls, cfg, num_labels: int, class_counts: list[int] | None = None) -> "Task":
        """The task as `cfg` (the run's config) sets it; `class_counts`: the train set's images per class,
        where the data can count them without reading images (None otherwise)."""
        raise NotImplementedError

    # the training loss is not the one evaluation measures (label smoothing, weights): report the plain one
    plain_differs = False

    # ---------------------------------------------------------------------------------- training
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss the step optimises (label smoothing, class weights... as configured)."""
        raise NotImplementedError

    def plain_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss as evaluation measures it (reported for training too), mean over the batch."""
        raise NotImplementedError

    def train_score(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """train_metric summed over the batch's images (a device tensor: no sync per step)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- evaluation
    def meter(self, device: torch.device, tune: bool = True) -> Meter:
        """A new evaluation; `tune`: it scores the model the run delivers, whose settings it may choose
        (multilabel: the thresholds)."""
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """What the model predicts from its probabilities: a class index per image (multilabel: 0/1 per
        label at the thresholds)."""
        raise NotImplementedError

    def per_image_loss(self, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each image's loss from its probabilities (eval's top losses)."""
        raise NotImplementedError

    def report(self, probs: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
        """`finetune eval`'s figures of a split: loss, the task's metrics and per-class (per-label) rows."""
        raise NotImplementedError

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        """For `val_loss`, `train_acc`, `live_val_map`...: the losses go down, every other metric up."""
        return not metric.endswith("loss")

    # ----------------------------------------------------------------------------------- labels
    def label_buffer(self, n: int) -> torch.Tensor:
        """Room for `n` labels as the data yields them (the feature cache keeps them)."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a trained model needs besides its weights (multilabel: its thresholds), for checkpoints and
        exports."""
        return {"task": self.name, "main": self.main}

    def load_state(self, state: dict | None) -> None:
        """The settings `state` (a checkpoint's) holds."""
