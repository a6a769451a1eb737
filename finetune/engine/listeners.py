"""What attaches to a run's loop (finetune/engine/loop.py): each listener reacts to a few events and owns one
concern. Events, in the order a run fires them: on_freeze_change (the trainable groups changed, already
applied), on_epoch_start, on_step_end (the step is done and counted), on_evaluation (eval_every: an
evaluation inside the epoch, recorded in state.evals), on_epoch_end (metrics recorded, the epoch
counted), on_end (the summary written), on_close (always, also after an error).

The weight average is updated inside Trainer.step, not here: it is part of the step that benchmarks
time, and an interruption between the optimizer step and its update would make resume inexact.
"""

from __future__ import annotations

import time

from finetune.engine.diagnostics import Diagnostics, FreezeIntegrity, resolve_every
from finetune.engine.observers import Listener, check_due
from finetune.engine.step import trace_rows
from finetune.output.progress import EpochProgress


class LRTrace(Listener):
    """Every group's LR and momentum as set on the optimizer at every step (read back, not recomputed),
    appended to lr_trace.csv; the step's rows stay in `run.last_rows` for the progress bar."""

    def on_step_end(self, run) -> None:
        run.last_rows = trace_rows(run.plan, run.optimizer, run.last_step, run.state.epoch, run.trainer.mask)
        run.trace.write(run.last_rows)


class LossCheck(Listener):
    """A NaN or infinite loss stops the run, naming the step and every group's LR."""

    def on_step_end(self, run) -> None:
        if check_due(run):
            run.check_losses()


class Progress(Listener):
    """The rich progress bar per epoch and the summary table at the end."""

    def __init__(self, run):
        # one bar for a distributed run: rank 0's (its shard's loss; images/s of all ranks)
        self.bar = EpochProgress(enabled=run.cfg.progress and run.world.main, group_names=[g.name for g in run.groups])

    def on_epoch_start(self, run) -> None:
        self.bar.start_epoch(run.state.epoch, run.plan.epochs, run.plan.steps_in(run.state.epoch), done=run.state.batch)

    def on_step_end(self, run) -> None:
        if check_due(run):
            seconds = time.perf_counter() - run._epoch_t0
            self.bar.update(run.state.batch, run.loss_sum.item() / run.seen, run.correct.item() / run.seen,
                            (run.seen - run.seen_before) * run.world.size / seconds,
                            run.last_rows)

    def on_epoch_end(self, run) -> None:
        self.bar.end_epoch(run.state.metrics[-1])

    def on_end(self, run) -> None:
        self.bar.summary(run.state.metrics, run.summary)

    def on_close(self, run) -> None:
        self.bar.stop()


class Checkpoints(Listener):
    """checkpoints/last.pt at every epoch's end and every `checkpoint_every` steps (after an evaluation
    at the same step, which it then holds)."""

    def on_step_end(self, run) -> None:
        every = run.cfg.checkpoint_every
        if every and run.state.step % every == 0 and run._saved_at != run.state.step:
            run.save()

    def on_epoch_end(self, run) -> None:
        run.save()


class StepEvaluation(Listener):
    """eval_every=N: an evaluation every N steps inside an epoch (an epoch's end evaluates anyway)."""

    def on_step_end(self, run) -> None:
        every, state = run.cfg.eval_every, run.state
        if every and state.step % every == 0 and state.batch < run.plan.steps_in(state.epoch):
            run.evaluate_midway()


class TensorBoard(Listener):
    """logger=tensorboard: every group's LR at every step, the train loss and accuracy every CHECK_EVERY
    steps, every evaluation and the epochs' metrics, under RUN_DIR/tensorboard (rank 0). A resumed run
    purges what the interrupted one wrote after its checkpoint, so the curves do not fork."""

    def __init__(self, run):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from finetune.base.errors import UserError

            raise UserError('logger=tensorboard needs the tensorboard package: pip install "finetune[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(run.out_dir / "tensorboard"), purge_step=run.state.step or None)

    def on_step_end(self, run) -> None:
        step = run.last_step
        for row in run.last_rows:
            self.writer.add_scalar(f"lr/{row['group']}", row["lr"], step)
        if check_due(run):
            self.writer.add_scalar("train/loss", run.loss_sum.item() / max(1, run.seen), step)
            self.writer.add_scalar("train/acc", run.correct.item() / max(1, run.seen), step)

    # x is the index of the step last done, as in lr_trace.csv: an evaluation after 6 steps sits at 5,
    # so that a resume from that checkpoint (purging x >= 6) keeps it
    def on_evaluation(self, run) -> None:
        row = run.state.evals[-1]
        for key in ("val_loss", "val_acc"):
            self.writer.add_scalar(f"val/{key[4:]}", row[key], row["step"] - 1)

    def on_epoch_end(self, run) -> None:
        metrics, step = run.state.metrics[-1], run.state.step - 1
        for key, value in metrics.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.add_scalar("val/loss", metrics["val_loss"], step)
        self.writer.add_scalar("val/acc", metrics["val_acc"], step)
        self.writer.flush()

    def on_close(self, run) -> None:
        self.writer.close()


LOGGERS = ("none", "tensorboard")


class Reports(Listener):
    """The run directory's CSV and JSON reports after every epoch (the plot only at the end)."""

    def on_epoch_end(self, run) -> None:
        run.report("running", plot=False)


# metrics best_metric may name, and whether more is better
BEST_METRICS = {"val_acc": True, "val_loss": False, "train_acc": True, "train_loss": False,
                "live_val_acc": True, "live_val_loss": False}


def best_epoch(metrics: list[dict], key: str, min_delta: float = 0.0) -> int:
    """The epoch whose `key` first beat every earlier best by more than `min_delta` last (pure, so a
    resumed run finds it again from its metrics)."""
    higher = BEST_METRICS[key]
    best, at = None, 0
    for i, row in enumerate(metrics):
        value = row[key] if higher else -row[key]
        if best is None or value > best + min_delta:
            best, at = value, i
    return at


BEST = "best.pt"


class BestCheckpoint(Listener):
    """checkpoints/best.pt: a copy of the checkpoint with the best `best_metric` so far, taken at epoch
    ends, and with eval_every at every evaluation (a checkpoint is written for one inside an epoch)."""

    def on_evaluation(self, run) -> None:
        if self._best_is_last(run):
            if run._saved_at != run.state.step:
                run.save()
            run.copy_checkpoint(run.ckpt_path.with_name(BEST))

    def on_epoch_end(self, run) -> None:
        if self._best_is_last(run):
            run.copy_checkpoint(run.ckpt_path.with_name(BEST))

    @staticmethod
    def _best_is_last(run) -> bool:
        rows = run.evaluations()
        return best_epoch(rows, run.cfg.best_metric) == len(rows) - 1


class EarlyStopping(Listener):
    """Ends the run after `patience` epochs in which `best_metric` gained no more than `min_delta`."""

    def on_epoch_end(self, run) -> None:
        metrics, cfg = run.state.metrics, run.cfg
        waited = len(metrics) - 1 - best_epoch(metrics, cfg.best_metric, cfg.min_delta)
        if waited >= cfg.patience and run.state.epoch < run.plan.epochs:
            run.finish_early(f"early stopping: {cfg.best_metric} has not improved by more than {cfg.min_delta:g} "
                             f"for {waited} epochs (best at epoch {len(metrics) - 1 - waited})")


def default_listeners(run) -> list[Listener]:
    """In order: the trace first (the others read this step's rows), an evaluation inside the epoch
    before the checkpoint of the same step (which then holds it), checkpoints after the checks, the best
    checkpoint after the epoch's own."""
    early = [EarlyStopping()] if run.cfg.patience else []  # before the checkpoint, which then records it
    logger = [TensorBoard(run)] if run.cfg.logger == "tensorboard" and run.world.main else []
    every = resolve_every(run.cfg.diag_every, run.plan.steps_per_epoch)
    diag = [Diagnostics(run, every)] if every else []
    # the integrity check first at an epoch's end: a changed frozen weight is never checkpointed
    return [LRTrace(), LossCheck(), Progress(run), FreezeIntegrity(), *diag, *early, StepEvaluation(), Checkpoints(),
            BestCheckpoint(), Reports(), *logger]
