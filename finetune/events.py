"""What attaches to a run's loop (finetune/run.py): each listener reacts to a few events and owns one
concern. Events, in the order a run fires them: on_freeze_change (the trainable groups changed, already
applied), on_epoch_start, on_step_end (the step is done and counted), on_epoch_end (metrics recorded,
the epoch counted), on_end (the summary written), on_close (always, also after an error).

The weight average is updated inside Trainer.step, not here: it is part of the step that benchmarks
time, and an interruption between the optimizer step and its update would make resume inexact.
"""

from __future__ import annotations

import time

from finetune.progress import EpochProgress
from finetune.trainer import trace_rows

CHECK_EVERY = 10  # steps between NaN checks and progress updates: each reads a tensor back (a device sync)


class Listener:
    def on_freeze_change(self, run) -> None: ...
    def on_epoch_start(self, run) -> None: ...
    def on_step_end(self, run) -> None: ...
    def on_epoch_end(self, run) -> None: ...
    def on_end(self, run) -> None: ...
    def on_close(self, run) -> None: ...


def _check_due(run) -> bool:
    return run.state.batch % CHECK_EVERY == 0 or run.state.batch == run.plan.steps_per_epoch


class LRTrace(Listener):
    """Every group's LR and momentum as set on the optimizer at every step (read back, not recomputed),
    appended to lr_trace.csv; the step's rows stay in `run.last_rows` for the progress bar."""

    def on_step_end(self, run) -> None:
        run.last_rows = trace_rows(run.plan, run.optimizer, run.last_step, run.state.epoch, run.trainer.mask)
        run.trace.write(run.last_rows)


class LossCheck(Listener):
    """A NaN or infinite loss stops the run, naming the step and every group's LR."""

    def on_step_end(self, run) -> None:
        if _check_due(run):
            run.check_losses()


class Progress(Listener):
    """The rich progress bar per epoch and the summary table at the end."""

    def __init__(self, run):
        self.bar = EpochProgress(enabled=run.cfg.progress, group_names=[g.name for g in run.groups])

    def on_epoch_start(self, run) -> None:
        self.bar.start_epoch(run.state.epoch, run.plan.epochs, run.plan.steps_per_epoch, done=run.state.batch)

    def on_step_end(self, run) -> None:
        if _check_due(run):
            seconds = time.perf_counter() - run._epoch_t0
            self.bar.update(run.state.batch, run.loss_sum.item() / run.seen, run.correct.item() / run.seen,
                            (run.seen - run.seen_before) / seconds,
                            run.last_rows)

    def on_epoch_end(self, run) -> None:
        self.bar.end_epoch(run.state.metrics[-1])

    def on_end(self, run) -> None:
        self.bar.summary(run.state.metrics, run.summary)

    def on_close(self, run) -> None:
        self.bar.stop()


class Checkpoints(Listener):
    """checkpoints/last.pt at every epoch's end and every `checkpoint_every` steps."""

    def on_step_end(self, run) -> None:
        if run.cfg.checkpoint_every and run.state.step % run.cfg.checkpoint_every == 0:
            run.save()

    def on_epoch_end(self, run) -> None:
        run.save()


class Reports(Listener):
    """The run directory's CSV and JSON reports after every epoch (the plot only at the end)."""

    def on_epoch_end(self, run) -> None:
        run.report("running", plot=False)


def default_listeners(run) -> list[Listener]:
    """In order: the trace first (the others read this step's rows), checkpoints after the checks."""
    return [LRTrace(), LossCheck(), Progress(run), Checkpoints(), Reports()]
