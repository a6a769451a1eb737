"""checkpoints/best.pt by a configurable metric, early stopping (patience, min_delta) that a resume
respects, and deterministic=true. Validation scores are scripted so each case is exact."""

import json
import math

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    QUIET,
    TINY,
    compose_cfg,
    run_cli,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.best import best_epoch
from finetune.engine.step import Trainer

RUN = ["experiment=none", "unfreeze=1", "schedule=constant"]


@pytest.fixture
def scripted(monkeypatch):
    """Trainer.evaluate returns (val_loss, val_acc) from a list, one pair per epoch."""
    def script(pairs):
        scores = iter(pairs)
        def evaluate(self, loader, average=False, **kw):
            loss, acc = next(scores)
            return {"loss": loss, "acc": acc, "bal_acc": acc, "f1_macro": acc}
        monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return script


def load(path):
    return torch.load(path, weights_only=True)


def test_best_checkpoint_keeps_the_best_epoch_by_the_chosen_metric(tmp_path, scripted):
    scripted([(0.9, 0.50), (0.4, 0.80), (0.6, 0.70), (0.3, 0.75)])
    summary = train(compose_cfg(*RUN, "epochs=4"), tmp_path / "acc")
    best = load(tmp_path / "acc" / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["metrics"][-1]["val_acc"] == 0.80  # the checkpoint after epoch 1
    assert summary["best_epoch"] == 1 and load(tmp_path / "acc" / "checkpoints" / checkpoint.LAST)["epoch"] == 4
    scripted([(0.9, 0.50), (0.4, 0.80), (0.6, 0.70), (0.3, 0.75)])
    summary = train(compose_cfg(*RUN, "epochs=4", "best_metric=val_loss"), tmp_path / "loss")
    assert load(tmp_path / "loss" / "checkpoints" / "best.pt")["epoch"] == 4 and summary["best_epoch"] == 3


def test_best_epoch_with_min_delta():
    rows = [{"val_acc": a} for a in (0.5, 0.8, 0.805, 0.9)]
    assert best_epoch(rows, "val_acc") == 3
    assert best_epoch(rows[:3], "val_acc") == 2 and best_epoch(rows[:3], "val_acc", min_delta=0.01) == 1


def test_early_stopping_ends_the_run_and_a_resume_trains_no_more(tmp_path, scripted):
    scripted([(0.9, 0.5), (0.5, 0.8), (0.5, 0.805), (0.6, 0.79), (0.2, 0.95), (0.1, 0.99)])
    run = tmp_path / "run"
    summary = train(compose_cfg(*RUN, "epochs=6", "patience=2", "min_delta=0.01"), run)
    assert summary["epochs"] == 4 and summary["status"] == "completed"  # epochs 2 and 3 gained < 0.01
    assert summary["finished_early"] == ("early stopping: val_acc has not improved by more than 0.01 for 2 epochs "
                                         "(best at epoch 1)")
    assert load(run / "checkpoints" / checkpoint.LAST)["finished_early"] == summary["finished_early"]
    assert json.loads((run / "summary.json").read_text())["finished_early"] == summary["finished_early"]
    again = train(compose_cfg(*RUN, "epochs=6", "patience=2", "min_delta=0.01", f"resume={run}"), run)
    assert again["epochs"] == 4


def test_deterministic_runs_with_deterministic_algorithms_and_restores_the_flags(tmp_path, monkeypatch):
    seen = []
    real = Trainer.step_accumulated  # what the run calls for each optimizer step

    def step(self, batches, at, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(self, batches, at, **kw)

    monkeypatch.setattr(Trainer, "step_accumulated", step)
    train(compose_cfg(*RUN, "epochs=1", "deterministic=true"), tmp_path / "det")
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # put back for whatever runs next


@pytest.mark.parametrize("override, message", [
    ("best_metric=val_f1", "best_metric: unknown value 'val_f1'; choose one of auto, val_acc, val_loss, val_map, "
                           "val_f1_macro, val_f1_micro, train_acc, train_loss, live_val_acc, live_val_loss, "
                           "live_val_map (closest: val_f1_micro, val_f1_macro, val_map)"),
    ("best_metric=val_map", "best_metric=val_map: task single_label measures val_loss, val_acc, val_bal_acc, "
                            "val_f1_macro, train_loss, train_acc"),
    ("best_metric=live_val_acc", "best_metric=live_val_acc exists only with a weight average (set ema_half_life)"),
    ("patience=-1", "patience and min_delta must be >= 0, got -1 and 0.0"),
])
def test_bad_stopping_settings_are_one_line(tmp_path, capsys, override, message):
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, *RUN, f"hydra.run.dir={tmp_path}", override)
    assert (code, lines) == (2, [f"finetune: error: {message}"])


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """accumulate=2 at batch 8 takes the steps of batch 16: the same samples per step (one global order),
    the same mean gradient, so the same weights (BatchNorm keeps its statistics: bn_eval) and LR trace."""
    from helpers import read_csv

    # SGD: its update is linear in the gradient (Adam would magnify float noise in near-zero gradients)
    common = [*RUN, "unfreeze=all", "freeze.bn_eval=true", "epochs=2", "data.train_size=32", "optimizer=sgd"]
    train(compose_cfg(*common, "batch_size=16"), tmp_path / "big")
    summary = train(compose_cfg(*common, "batch_size=8", "accumulate=2"), tmp_path / "acc")
    big, acc = load(tmp_path / "big" / "checkpoints" / checkpoint.LAST), load(tmp_path / "acc" / "checkpoints" / checkpoint.LAST)
    assert acc["step"] == big["step"] == 4  # 2 optimizer steps an epoch
    for key, value in big["model"].items():
        assert torch.allclose(acc["model"][key].float(), value.float(), rtol=1e-4, atol=1e-6), key
    assert read_csv(tmp_path / "acc" / "lr_trace.csv") == read_csv(tmp_path / "big" / "lr_trace.csv")
    losses = [(float(a["train_loss"]), float(b["train_loss"])) for a, b in
              zip(read_csv(tmp_path / "acc" / "metrics.csv"), read_csv(tmp_path / "big" / "metrics.csv"))]
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in losses)
    assert summary["epochs"] == 2


def test_an_epoch_that_accumulate_does_not_divide_ends_with_a_partial_step(tmp_path, monkeypatch):
    """4 micro-batches an epoch, accumulate=3: a step of 3 and a final step of 1, every image trained
    (before: 2 steps an epoch planned, 1 taken, 24 of 32 images)."""
    taken = []
    real = Trainer.step_accumulated

    def counted(self, batches, step, *args, **kwargs):
        taken.append([int(y.numel()) for _, y in batches])
        return real(self, batches, step, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step_accumulated", counted)
    train(compose_cfg(*RUN, "unfreeze=all", "epochs=2", "data.train_size=32", "accumulate=3", "cache=false"),
          tmp_path / "run")
    assert taken == [[8, 8, 8], [8]] * 2
    assert load(tmp_path / "run" / "checkpoints" / checkpoint.LAST)["step"] == 4
    assert [int(r["step"]) for r in read_csv(tmp_path / "run" / "lr_trace.csv")][::6] == [0, 1, 2, 3]


def test_accumulate_out_of_range_is_one_line(tmp_path, capsys):
    for value, message in (("0", "accumulate must be >= 1 (micro-batches per optimizer step), got 0"),
                           ("9", "accumulate=9 is more than the 3 batches of an epoch; lower it or batch_size")):
        code, lines = run_cli(capsys, "train", *TINY, *QUIET, *RUN, f"hydra.run.dir={tmp_path / value}",
                              f"accumulate={value}")
        assert (code, lines) == (2, [f"finetune: error: {message}"])


def test_a_time_limit_stops_like_a_signal_with_exit_3_and_the_run_resumes(tmp_path, capsys):
    import re

    run = tmp_path / "run"
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, *RUN, "epochs=3", f"hydra.run.dir={run}", "time_limit=1e-6")
    assert code == 3  # a job script can requeue on it
    assert re.fullmatch(rf"finetune: stopped by time_limit=1e-06 min after 1 of 9 steps \(epoch 0, batch 1\); "
                        rf"checkpoint written to {re.escape(str(run))}/checkpoints/last.pt", lines[-2]), lines
    assert lines[-1].startswith("finetune: resume with: finetune train ") and f"resume={run}" in lines[-1]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert load(run / "checkpoints" / checkpoint.LAST)["step"] == 1
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, *RUN, "epochs=3", f"hydra.run.dir={run}", f"resume={run}")
    assert code == 0, lines
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_the_time_limit_stops_an_evaluation_between_batches(tmp_path, monkeypatch):
    """The limit passes while the val set is scored (at its second batch): the run stops there, as for a
    signal, with the checkpoint of the step, and the resume scores the epoch (before: the whole evaluation
    ran past the limit)."""
    from finetune.engine.loop import Run
    from finetune.engine.signals import Interrupted

    scored = []
    real = Trainer.evaluate

    def evaluate(self, loader, average=False, stop=None, **kw):
        def counting():
            scored.append(1)
            return stop() if stop is not None else False
        return real(self, loader, average=average, stop=counting, **kw)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Run, "out_of_time", lambda self: len(scored) >= 2)
    cfg = [*RUN, "epochs=2", "data.val_size=64", "cache=false"]
    with pytest.raises(Interrupted, match="stopped by time_limit=10 min after 3 of 6 steps"):
        train(compose_cfg(*cfg, "time_limit=10"), tmp_path / "run")
    assert len(scored) == 2  # the second batch never ran
    saved = load(tmp_path / "run" / "checkpoints" / checkpoint.LAST)
    assert (saved["step"], saved["epoch"], saved["metrics"]) == (3, 0, [])
    monkeypatch.undo()
    train(compose_cfg(*cfg, f"resume={tmp_path / 'run'}"), tmp_path / "run")
    train(compose_cfg(*cfg), tmp_path / "straight")
    assert read_csv(tmp_path / "run" / "metrics.csv")[0]["val_acc"] == read_csv(tmp_path / "straight" / "metrics.csv")[0]["val_acc"]


def test_eval_every_records_every_evaluation_and_best_pt_can_be_mid_epoch(tmp_path, scripted):
    # 3 steps an epoch, eval_every=2: step 2 (inside epoch 0), 3 (its end), 4 (inside epoch 1), 6 (its end)
    scripted([(0.9, 0.5), (0.5, 0.6), (0.2, 0.9), (0.4, 0.7)])
    summary = train(compose_cfg(*RUN, "epochs=2", "eval_every=2"), tmp_path / "run")
    evals = [(int(r["step"]), int(r["epoch"]), float(r["val_acc"])) for r in read_csv(tmp_path / "run" / "evals.csv")]
    assert evals == [(2, 0, 0.5), (3, 0, 0.6), (4, 1, 0.9), (6, 1, 0.7)]
    best = load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert (best["step"], best["epoch"], best["batch"]) == (4, 1, 1)  # written for the evaluation at step 4
    # one best, wherever it was measured: summary.json agrees with best.pt (before: best_val_acc 0.7, the epochs' best)
    assert summary["best"] == {"metric": "val_acc", "value": 0.9, "val_acc": 0.9, "epoch": 1, "step": 4}
    assert summary["best_val_acc"] == 0.9 and summary["best_epoch"] == 1
    assert [float(m["val_acc"]) for m in read_csv(tmp_path / "run" / "metrics.csv")] == [0.6, 0.7]


def test_evaluations_inside_epochs_change_nothing_in_training(tmp_path):
    plain = train(compose_cfg("epochs=2"), tmp_path / "plain")
    often = train(compose_cfg("epochs=2", "eval_every=1"), tmp_path / "often")
    a = load(tmp_path / "plain" / "checkpoints" / checkpoint.LAST)["model"]
    b = load(tmp_path / "often" / "checkpoints" / checkpoint.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm back in train mode, no RNG drawn
    assert plain["final_val_acc"] == often["final_val_acc"]
    assert len(read_csv(tmp_path / "often" / "evals.csv")) == 6


def test_max_steps_ends_inside_an_epoch_and_the_schedule_ends_with_it(tmp_path):
    # 3 steps an epoch: epochs=3 max_steps=5 trains epoch 0 and 2 steps of epoch 1, then evaluates
    summary = train(compose_cfg(*RUN, "epochs=3", "max_steps=5", "schedule=cosine", "schedule.warmup=0", "lr=0.01"), tmp_path / "run")
    assert summary["epochs"] == 2 and summary["status"] == "completed"
    trace = [r for r in read_csv(tmp_path / "run" / "lr_trace.csv") if r["group"] == "head"]
    assert [int(r["step"]) for r in trace] == [0, 1, 2, 3, 4]
    # cosine over the 5 steps the run has (not the 9 that epochs=3 would have)
    assert float(trace[-1]["lr"]) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert load(tmp_path / "run" / "checkpoints" / checkpoint.LAST)["step"] == 5
    with pytest.raises(UserError, match="max_steps must be >= 1"):
        train(compose_cfg("max_steps=0"), tmp_path / "bad")


def test_tensorboard_logs_every_groups_lr_and_the_metrics_and_a_resume_does_not_fork(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.engine.signals import Interrupted

    run, tb = tmp_path / "run", ["epochs=2", "logger=tensorboard", "eval_every=2"]  # 3 steps an epoch
    with pytest.raises(Interrupted):
        train(compose_cfg(*tb), run, stop_at_step=2)
    early = run / "checkpoints" / "early.pt"
    early.write_bytes((run / "checkpoints" / checkpoint.LAST).read_bytes())
    with pytest.raises(Interrupted):  # steps 2 and 3 logged, then resumed from step 2 again
        train(compose_cfg(*tb, f"resume={run}"), run, stop_at_step=4)
    train(compose_cfg(*tb, f"resume={early}"), run)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"lr/stem", "lr/head", "train/loss", "val/acc", "epoch/val_acc"} <= set(tags)
    head = [(e.step, e.value) for e in events.Scalars("lr/head")]
    trace = [(int(r["step"]), float(r["lr"])) for r in read_csv(run / "lr_trace.csv") if r["group"] == "head"]
    assert [s for s, _ in head] == list(range(6))  # once per step, none twice after the resume
    assert [v for _, v in head] == pytest.approx([v for _, v in trace])
    val = [(e.step, round(e.value, 6)) for e in events.Scalars("val/acc")]
    evals = [(int(r["step"]) - 1, round(float(r["val_acc"]), 6)) for r in read_csv(run / "evals.csv")]
    assert [int(r["step"]) for r in read_csv(run / "evals.csv")] == [2, 3, 4, 6]  # the one at step 2 kept
    assert sorted(set(val)) == sorted(set(evals))
