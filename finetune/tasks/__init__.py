"""What kind of prediction a run learns (the Task seam): the label format, the loss, the metrics with their
directions, how logits become predictions, and the head's output size. The step, the loop, the feature
cache, evaluation, eval/predict/export ask the run's task instead of assuming one.

`single_label` (one class per image: softmax, cross-entropy, accuracy) and `multilabel` (a set of labels per
image: sigmoids, binary cross-entropy, mAP and F1 at per-label thresholds chosen on the val set). A new task
is one module here with a Task subclass, its entry in TASKS and a file in conf/task/.
"""

from __future__ import annotations

from finetune.base.errors import UserError
from finetune.tasks.base import Meter, Task
from finetune.tasks.multilabel import MultiLabel
from finetune.tasks.single_label import SingleLabel

TASKS: dict[str, type[Task]] = {"single_label": SingleLabel, "multilabel": MultiLabel}

__all__ = ["TASKS", "Meter", "MultiLabel", "SingleLabel", "Task", "build", "from_state", "kind_for"]


def kind_for(configured: str, multilabel_data: bool) -> str:
    """The task a run trains: task.kind as configured, or with `auto` what the data holds (a label file
    with several labels on a row is multi-label)."""
    configured = str(configured)
    if configured == "auto":
        return "multilabel" if multilabel_data else "single_label"
    if configured not in TASKS:
        raise UserError(f"task.kind: unknown task '{configured}'; choose auto, {', '.join(TASKS)}")
    if configured == "single_label" and multilabel_data:
        raise UserError("task=single_label, but the labels give some images several labels: use task=multilabel "
                        "(or task=auto, which detects it)")
    return configured


def build(cfg, num_labels: int, multilabel_data: bool = False, class_counts: list[int] | None = None) -> Task:
    """The run's task from its config (`cfg`: the whole run config) and the data (`class_counts`: the train
    set's images per class, None where unknown)."""
    kind = kind_for(cfg.task.kind, multilabel_data)
    return TASKS[kind].from_config(cfg, num_labels, class_counts)


def from_state(state: dict | None, num_labels: int) -> Task:
    """The task of a trained model from its checkpoint's `task` entry (a checkpoint of before tasks:
    single-label), its settings (thresholds) restored."""
    kind = (state or {}).get("task", "single_label")
    if kind not in TASKS:
        raise UserError(f"the checkpoint's task '{kind}' is not one this finetune knows ({', '.join(TASKS)})")
    task = TASKS[kind](num_labels)
    task.load_state(state)
    return task
