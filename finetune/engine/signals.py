"""How a run stops early and says so: SIGINT/SIGTERM set a flag the loop polls after each step, and
`Interrupted` carries where the checkpoint is and what a CLI exits with."""

from __future__ import annotations

import signal
from pathlib import Path

TIME_LIMIT_EXIT = 3  # the exit code of a run stopped by its time_limit: a job script can requeue on it


class Interrupted(Exception):
    """The run stopped early (SIGINT/SIGTERM, its time_limit, or `stop_at_step`) after writing a checkpoint.

    `reason` says why and where; `out_dir` is what `resume=` takes to continue; `signum` is the signal
    (None otherwise); `exit_code` what a CLI exits with: 128 + signum for a signal (the shell's
    convention), TIME_LIMIT_EXIT for the time limit, 130 for stop_at_step."""

    def __init__(self, reason: str, out_dir: Path, signum: int | None, exit_code: int | None = None):
        super().__init__(f"{reason}. Resume with: finetune train resume={out_dir} <the same overrides>")
        self.reason, self.out_dir, self.signum = reason, out_dir, signum
        self.exit_code = exit_code if exit_code is not None else 128 + (signum or 2)


class EvaluationStopped(Exception):
    """A signal arrived during an evaluation, which stopped between two batches (it changes no state, so
    the run's checkpoint of the step before it resumes exactly, evaluation included)."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step and checkpoints."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
