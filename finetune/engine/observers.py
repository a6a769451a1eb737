"""What watches a run's loop (finetune.engine.loop) without steering it: the progress bar here, the
experiment trackers (TensorBoard, MLflow, W&B) in finetune.engine.trackers.

The loop decides everything itself (evaluation, checkpoints, best.pt, early stopping, stop checks) and
then tells each observer what happened, with plain values: an observer never sees the run, so it
cannot call back into it, and the order observers are called in changes nothing the run computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.output.progress import EpochProgress

CHECK_EVERY = 10  # steps between NaN checks and progress updates: each reads a tensor back (a device sync)


def check_due(batch: int, steps_in_epoch: int) -> bool:
    """Every CHECK_EVERY steps and at an epoch's last step (the same steps on every rank)."""
    return batch % CHECK_EVERY == 0 or batch == steps_in_epoch


@dataclass
class StepView:
    """One optimizer step as observers see it: `step` is the index of the step just done; `running`
    (train loss, train accuracy, images/s of all ranks) is there at check_due steps only."""
    step: int
    epoch: int
    batch: int  # optimizer steps done in this epoch
    rows: list[dict]  # every group's LR and momentum as set for this step (the LR trace's rows)
    running: tuple[float, float, float] | None = None


class Observer:
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, view: StepView) -> None: ...
    def evaluation(self, row: dict) -> None: ...  # eval_every: {step, epoch, val_*} inside an epoch
    def epoch_end(self, metrics: dict, step: int) -> None: ...  # `step`: the steps done so far
    def checkpoint(self, step: int) -> None: ...  # a checkpoint of `step` steps, holding all observed so far, is written
    def end(self, metrics: list[dict], summary: dict) -> None: ...
    def close(self) -> None: ...


class ProgressBar(Observer):
    """The rich progress bar per epoch and the summary table at the end."""
    def __init__(self, enabled: bool, group_names: list[str]):
        self.bar = EpochProgress(enabled=enabled, group_names=group_names)

    def epoch_start(self, epoch, epochs, steps, done):
        self.bar.start_epoch(epoch, epochs, steps, done=done)

    def step(self, view):
        if view.running is not None:
            self.bar.update(view.batch, *view.running, view.rows)
        else:
            self.bar.step(view.batch)

    def epoch_end(self, metrics, step):
        self.bar.end_epoch(metrics)

    def end(self, metrics, summary):
        self.bar.summary(metrics, summary)

    def close(self):
        self.bar.stop()
