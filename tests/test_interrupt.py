"""Interruptions: SIGINT/SIGTERM stop a real `python -m finetune train` after the current step with a
checkpoint and the command that resumes; SIGKILL in the middle of a checkpoint write never corrupts the
last good checkpoint; a NaN loss stops with the step and every group's LR, keeping the last good one."""

import json
import multiprocessing
import os
import pickle
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    ONE_THREAD_ENV,
    QUIET,
    TINY,
    compose_cfg,
    run_cli,
)

from finetune.base import files
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.divergence import NonFiniteLoss

# 8 epochs of 3 steps: long enough to signal it mid-run; only the head trains, so steps are quick
LONG = [*TINY, "epochs=8", "experiment=none", "unfreeze=1", "schedule=cosine"]
STEPS = 8 * 3
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def start_run(cwd: Path, *args: str) -> subprocess.Popen:
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:  # no pipe to fill up
        return subprocess.Popen([sys.executable, "-m", "finetune", "train", *args], cwd=cwd, stdout=out,
                                stderr=err, text=True, env={**os.environ, **ONE_THREAD_ENV})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes(tmp_path, sig):
    run = tmp_path / "run"
    proc = start_run(tmp_path, *LONG, "hydra.run.dir=run")
    wait_for(run / "checkpoints" / checkpoint.LAST, proc)  # epoch 0 is done: training is under way
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == EXIT_CODES[sig]
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err
    stopped, resume = err.strip().splitlines()[-2:]
    match = re.fullmatch(rf"finetune: stopped by {sig.name} after (\d+) of {STEPS} steps \(epoch (\d+), batch (\d)\); "
                         rf"checkpoint written to {re.escape(str(run))}/checkpoints/last.pt", stopped)
    assert match, stopped
    steps, epoch, batch = map(int, match.groups())
    # after a step (an epoch's last one included: batch 3), or after an evaluation (batch 0)
    assert 3 <= steps < STEPS and epoch * 3 + batch == steps and 0 <= batch <= 3
    saved = torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (steps, epoch, batch)
    # every step done is in the trace file, streamed and flushed with the checkpoint (which holds no trace)
    assert "trace" not in saved and len(read_csv(run / "lr_trace.csv")) == steps * 6

    # the printed command continues the run in its own directory
    assert resume.startswith("finetune: resume with: finetune train ") and f"resume={run}" in resume
    if sig is signal.SIGTERM:
        return  # one resume suffices; it is the same checkpoint path
    command = shlex.split(resume.removeprefix("finetune: resume with: "))
    assert command[2:-2] == LONG and command[-2:] == [f"resume={run}", f"hydra.run.dir={run}"]
    done = subprocess.run([sys.executable, "-m", "finetune", *command[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD_ENV})
    assert done.returncode == 0, done.stderr
    final = torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert (final["step"], final["epoch"], len(final["metrics"])) == (STEPS, 8, 8)
    assert [int(row["step"]) for row in read_csv(run / "lr_trace.csv")[::6]] == list(range(STEPS))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"  # not left "interrupted"


# --------------------------------------------------------------------------------- atomic checkpoints


def _write_forever(path: str, versions: list) -> None:
    """Child process: overwrite `path` with one version after another until killed."""
    for i in range(10**9):
        files.atomic_save(versions[i % len(versions)], path)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_corrupts_the_last_checkpoint(tmp_path):
    # 16 MB per version, written over and over: most of the writer's time is spent inside a write
    versions = [{"format": checkpoint.FORMAT, "version": v, "data": torch.full((4_000_000,), v, dtype=torch.int32)}
                for v in range(3)]
    path = tmp_path / "checkpoints" / checkpoint.LAST
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")  # the tensors are inherited, nothing to pickle or import
    killed_mid_write = 0
    for _ in range(6):
        before = set(path.parent.glob("*.tmp")) if path.parent.exists() else set()
        writer = fork.Process(target=_write_forever, args=(str(path), versions))
        writer.start()
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        killed_mid_write += len(set(path.parent.glob("*.tmp")) - before)

        loaded = files.safe_load(path)  # always a complete version, never a torn one
        assert torch.equal(loaded["data"], versions[loaded["version"]]["data"])
        # what resume= reads, given the run directory, is that same file: the temporary ones are ignored
        assert checkpoint.load_checkpoint(str(tmp_path))[0] == path
    assert killed_mid_write >= 1  # the kills did land inside writes, leaving their temporary files
    assert all(re.fullmatch(r"\.last\.pt\.\d+\.[0-9a-f]{8}\.tmp", p.name) for p in path.parent.glob("*.tmp"))


def test_a_write_that_fails_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    files.atomic_save({"version": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        files.atomic_save({"version": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert files.safe_load(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -------------------------------------------------------------------------------------------- NaN loss

DIVERGE = ["epochs=3", "experiment=none", "optimizer=sgd", "lr=1e6", "schedule=constant", "unfreeze=2"]


def test_nan_loss_stops_naming_the_step_and_every_lr_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss) as info:
        train(compose_cfg(*DIVERGE, "checkpoint_every=1"), tmp_path)
    ckpt = tmp_path / "checkpoints" / checkpoint.LAST
    # the loss; or first a weight or BatchNorm statistic (checked before every checkpoint), or the val loss
    what, step = re.match(r"((?:val )?loss became (?:nan|inf|-inf) (?:at|after) step|\S+ became non-finite by step) "
                          r"(\d+) ", str(info.value)).groups()
    step = int(step)
    frozen = ", ".join(f"{g}=1e+06 (frozen)" for g in ("stem", "layer1", "layer2", "layer3"))
    assert str(info.value) == (
        f"{what} {step} (epoch {step // 3}) with LRs {frozen}, layer4=1e+06, head=1e+06; "
        f"stopped, the last good checkpoint {ckpt} is kept. Lower the LR or set grad_clip")
    saved = torch.load(ckpt, weights_only=True)
    # written after the last step whose loss, weights and statistics were finite, never after a bad one;
    # a val loss is measured after its epoch's last step, which that checkpoint includes
    assert saved["step"] == step + what.startswith("val")
    assert all(torch.isfinite(v.float()).all() for v in saved["model"].values())


def test_nan_loss_on_the_command_line_is_exit_2(tmp_path, capsys):
    code, lines = run_cli(capsys, "train", *TINY, *DIVERGE, f"hydra.run.dir={tmp_path}", *QUIET)
    assert code == 2 and len(lines) == 1
    assert re.fullmatch(r"finetune: error: (val )?loss became (nan|inf|-inf) (at|after) step \d+ \(epoch \d\) with LRs "
                        r"stem=1e\+06 \(frozen\), .*; stopped, .*\. Lower the LR or set grad_clip", lines[0])


@pytest.mark.parametrize("at", [1, 2], ids=["first-epoch", "last-epoch"])
def test_a_signal_during_an_evaluation_stops_it_and_the_resume_is_exact(tmp_path, monkeypatch, at):
    """SIGTERM while the val set is scored: the evaluation stops between two batches, the run checkpoints
    and exits as interrupted (the last epoch's too: it used to finish and say completed), and the resume
    evaluates that epoch again and ends exactly where a run without the signal ends."""
    from finetune.engine.signals import Interrupted
    from finetune.engine.step import Trainer

    args = [*TINY, "epochs=2", "experiment=none", "data.val_size=32"]
    straight = train(compose_cfg(*args), tmp_path / "straight")
    real, calls = Trainer.evaluate, []

    def signalled(self, loader, *a, **k):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)  # the StopFlag of the run takes it
        return real(self, loader, *a, **k)

    monkeypatch.setattr(Trainer, "evaluate", signalled)
    with pytest.raises(Interrupted) as stop:
        train(compose_cfg(*args), tmp_path / "run")
    assert stop.value.exit_code == 143 and "stopped by SIGTERM" in stop.value.reason
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs"] == at - 1
    monkeypatch.undo()
    resumed = train(compose_cfg(*args, f"resume={tmp_path / 'run'}"), tmp_path / "run")
    assert resumed["status"] == "completed"
    assert [(m["val_loss"], m["val_acc"]) for m in read_metrics(tmp_path / "run")] == \
        [(m["val_loss"], m["val_acc"]) for m in read_metrics(tmp_path / "straight")]
    a = torch.load(tmp_path / "straight" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert straight["final_val_acc"] == resumed["final_val_acc"]


def read_metrics(run: Path) -> list[dict]:
    return read_csv(run / "metrics.csv")


def test_a_signal_while_the_final_reports_are_written_lets_them_finish(tmp_path, monkeypatch, caplog):
    """SIGTERM after the last step, while the reports and plots are drawn: they finish (the signal is
    taken after them), the run says it completed; a resume of the finished run draws the plots again."""
    import logging

    from finetune.output import report

    real, calls = report.plot_lr_trace, []

    def signalled(*a, **k):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(report, "plot_lr_trace", signalled)
    args = [*TINY, "epochs=1", "experiment=none"]
    with caplog.at_level(logging.WARNING, logger="finetune"):
        summary = train(compose_cfg(*args), tmp_path / "run")
    assert calls and summary["status"] == "completed"
    assert "SIGTERM arrived after the last step: the run is complete" in caplog.text
    for name in ("lr_trace.png", "diagnostics.png", "activations.png"):
        assert (tmp_path / "run" / name).is_file(), name
    monkeypatch.undo()
    (tmp_path / "run" / "diagnostics.png").unlink()
    train(compose_cfg(*args, f"resume={tmp_path / 'run'}"), tmp_path / "run")
    assert (tmp_path / "run" / "diagnostics.png").is_file()  # drawn again
