"""Hydra callbacks (configured under hydra.callbacks in conf/train.yaml): every job records its number and
overrides when it starts; after a multirun the sweep's summary is written and printed. With logger=mlflow
a sweep is one MLflow parent run, every job's run its child (finetune.engine.trackers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.base.errors import UserError
from finetune.commands import sweep
from finetune.engine import checkpoint, trackers
from finetune.output import report


class SweepSummary(Callback):
    """job.json in every job directory; after a multirun, the sweep's summary in its directory and, when
    the command line asks for it (`report`: a file), the counts it ends with."""

    def __init__(self, report: str | None = None):
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """One sweep at a time in a sweep directory: a second one there would write the same job directories."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        holder = sweep.lock(sweep_dir)
        if holder is not None:
            print(f"finetune: error: {sweep_dir} is in use by another sweep (process {holder}); wait for it, or "
                  "choose another directory (hydra.sweep.dir=...)", file=sys.stderr)
            sys.exit(2)
        planned = _planned_jobs(config)
        if planned is not None:  # `finetune summarize` lists the jobs that never started too
            sweep.write_plan(sweep_dir, planned)
        try:  # logger=mlflow: the sweep's parent run, which the jobs' runs find in the sweep directory
            trackers.start_sweep(config.logger, sweep_dir)
        except UserError as err:  # the tracker's package is missing
            sweep.unlock(sweep_dir)
            print(f"finetune: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        # a job directory that holds a run is not rewritten unless this job continues or replaces it
        # (train then refuses the job with the reason)
        # (train then refuses the job with the reason); a rerun of the sweep resumes one whose process died
        taken = checkpoint.holds_run(job_dir) and not (config.get("resume") or config.get("overwrite"))
        if taken and _is_multirun(config) and sweep.rerun_action(job_dir) in ("resume", "fresh"):
            taken = False
        if _is_multirun(config) and not taken:
            sweep.write_job_file(job_dir, config.hydra.job.num, list(config.hydra.overrides.task))

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        # the train task records its own failures; this catches one that escaped it (e.g. in Hydra's job set-up)
        if _is_multirun(config) and job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # re-raises a failed job's exception
            except Exception as err:
                mark_failed(Path(config.hydra.runtime.output_dir), err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep.unlock(sweep_dir)
        rows = sweep.summarize(sweep_dir)
        trackers.end_sweep(sweep_dir)  # after the summary, which the MLflow parent run keeps
        if not rows:  # no job ran
            return
        if self.report:
            Path(self.report).write_text(json.dumps({"failed": sweep.failed(rows), "total": len(rows),
                                                     "sweep_dir": str(sweep_dir)}))


def _planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in job order, as Hydra's basic sweeper will run them (None for another
    sweeper: Optuna decides its trials as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    params = config.hydra.sweeper.get("params") or {}
    parsed += OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return config.hydra.mode == RunMode.MULTIRUN


def mark_failed(job_dir: Path, err: BaseException) -> str:
    """Record a failed job in its summary.json (kept metrics of finished epochs stay) and its traceback in
    error.log; returns the one-line reason."""
    import traceback

    reason = " ".join(str(err).split()) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    summary = sweep.read_json(job_dir / "summary.json") or {}
    summary.update(status="failed", reason=reason)
    job_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(job_dir / "summary.json", summary)
    (job_dir / "error.log").write_text("".join(traceback.format_exception(err)))
    return reason
