"""What may observe a run's loop (finetune.engine.loop): the Listener interface and how often a listener
reads a tensor back. Events, in the order a run fires them: on_freeze_change (the trainable groups
changed, already applied), on_epoch_start, on_step_end (the step is done and counted), on_evaluation
(eval_every: an evaluation inside the epoch, recorded in state.evals), on_epoch_end (metrics recorded,
the epoch counted), on_end (the summary written), on_close (always, also after an error)."""

from __future__ import annotations

CHECK_EVERY = 10  # steps between NaN checks and progress updates: each reads a tensor back (a device sync)


class Listener:
    def on_freeze_change(self, run) -> None: ...
    def on_epoch_start(self, run) -> None: ...
    def on_step_end(self, run) -> None: ...
    def on_evaluation(self, run) -> None: ...
    def on_epoch_end(self, run) -> None: ...
    def on_end(self, run) -> None: ...
    def on_close(self, run) -> None: ...


def check_due(run) -> bool:
    """Every CHECK_EVERY steps and at an epoch's last step (the same steps on every rank)."""
    return run.state.batch % CHECK_EVERY == 0 or run.state.batch == run.plan.steps_in(run.state.epoch)
