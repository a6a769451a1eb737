"""Exact resume: a run split by an interruption, then continued with resume=, ends bit-identical to one
straight run, across a gradual unfreeze (AdamW state for the newly trained group, its own schedule start),
dropout (global RNG) and augmentation (data order); and resumes that would not continue the run are refused.
`train()` runs in-process on the CLI's config (tiny_runs)."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import read_csv
from tiny_runs import compose_cfg as compose_tiny

from finetune.base import files
from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.signals import Interrupted

# 4 epochs: the head alone in epochs 0-1, layer4 joins at epoch 2 (step 6) with its own slanted triangle;
# dropout before the head draws from the global RNG, so the RNG state must be restored too
PLAN = ["experiment=gradual", "freeze.every=2", "epochs=4", "model.drop_rate=0.2"]
STEPS_PER_EPOCH = 3
TIMING = ("seconds", "images_per_s")


def compose_cfg(*overrides):
    return compose_tiny(*PLAN, *overrides)


def load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and buffers, optimizer state, LR trace and metrics (timings aside)."""
    ca, cb = load(a), load(b)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert (ca["ema"] is None) == (cb["ema"] is None)
    if ca["ema"] is not None:  # the weight average and its update count
        assert ca["ema"]["updates"] == cb["ema"]["updates"]
        for key in ca["ema"]["model"]:
            assert torch.equal(ca["ema"]["model"][key], cb["ema"]["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for param in sa:
        for name in sa[param]:
            assert torch.equal(sa[param][name], sb[param][name]), (param, name)
    assert (a / "lr_trace.csv").read_text() == (b / "lr_trace.csv").read_text()
    ma, mb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in ma] == \
        [{k: v for k, v in m.items() if k not in TIMING} for m in mb]
    assert len(ma) == 4
    assert (ca["epoch"], ca["step"], cb["epoch"], cb["step"]) == (4, 12, 4, 12)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 4 epochs in one go."""
    out = tmp_path_factory.mktemp("straight")
    train(compose_cfg(), out)
    return out


def test_run_stopped_after_2_epochs_then_resumed_to_4_is_bit_identical(straight, tmp_path):
    """Stopped at the end of epoch 1, right before layer4 unfreezes; resumed in a new run directory."""
    first, second = tmp_path / "first", tmp_path / "second"
    with pytest.raises(Interrupted, match="resume=") as info:
        train(compose_cfg(), first, stop_at_step=2 * STEPS_PER_EPOCH)
    assert info.value.out_dir == first and info.value.signum is None
    saved = load(first)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (2, 0, 6)
    assert len(read_csv(first / "metrics.csv")) == 2  # both epochs evaluated before stopping
    trace = read_csv(first / "lr_trace.csv")
    assert {int(r["step"]) for r in trace} == set(range(6))
    assert {r["trainable"] for r in trace if r["group"] == "layer4"} == {"0"}  # not unfrozen yet

    train(compose_cfg(f"resume={first}"), second)  # a new run directory, as Hydra gives the CLI
    assert_same_run(straight, second)
    trace = read_csv(second / "lr_trace.csv")
    assert [r["trainable"] for r in trace if r["group"] == "layer4"] == ["0"] * 6 + ["1"] * 6


def test_resume_from_a_periodic_mid_epoch_checkpoint(straight, tmp_path, monkeypatch):
    """checkpoint_every=4: keep the step-8 checkpoint (epoch 2, batch 2: just after the unfreeze, with AdamW
    state for layer4 and half an epoch's sums) of a complete run, resume from it, land on the same result."""
    saved_steps = []
    real_save = files.atomic_save

    def save_and_keep(obj, path):
        real_save(obj, path)
        saved_steps.append(obj["step"])
        if obj["step"] == 8:
            shutil.copy(path, tmp_path / "step8.pt")

    monkeypatch.setattr(files, "atomic_save", save_and_keep)
    train(compose_cfg("checkpoint_every=4"), tmp_path / "periodic")
    monkeypatch.undo()
    assert saved_steps == [3, 4, 6, 8, 9, 12, 12]  # epoch ends and every 4 steps (12: both)
    assert_same_run(straight, tmp_path / "periodic")  # checkpointing itself changes nothing
    at8 = torch.load(tmp_path / "step8.pt", weights_only=True)
    assert (at8["epoch"], at8["batch"], at8["epoch_seen"]) == (2, 2, 16)

    train(compose_cfg(f"resume={tmp_path / 'step8.pt'}", "checkpoint_every=4"), tmp_path / "resumed")
    assert_same_run(straight, tmp_path / "resumed")


def test_resume_with_a_weight_average_is_bit_identical(tmp_path):
    """ema_half_life: the average (and the metrics that score it) continue exactly, mid-epoch too."""
    train(compose_cfg("ema_half_life=1"), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(compose_cfg("ema_half_life=1"), tmp_path / "first", stop_at_step=STEPS_PER_EPOCH + 1)
    train(compose_cfg("ema_half_life=1", f"resume={tmp_path / 'first'}"), tmp_path / "second")
    assert_same_run(tmp_path / "straight", tmp_path / "second")
    assert load(tmp_path / "second")["ema"]["updates"] == 12


@pytest.mark.parametrize("overrides, message", [
    (["model.name=resnet34"],
     "resume: the checkpoint was trained with model.name=resnet18, not resnet34; resuming a different model "
     "is refused"),
    (["model.groups={body:[conv1,bn1,layer],head:[fc]}"],
     "resume: the layer groups changed (checkpoint ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'], "
     "now ['body', 'head']); resuming with other groups is refused"),
    (["model.groups={stem:[conv1,bn1],layer1:[layer1],layer2:[layer2],layer3:[layer3,layer4.0],"
      "layer4:[layer4],head:[fc]}"],
     "resume: the layer groups changed (same names ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'] "
     "but different parameters in them)"),
    (["data.num_classes=3"], "resume: the model's parameters do not fit the checkpoint (fc.bias: checkpoint "
                             "(2,) vs now (3,)"),
    (["optimizer=sgd"], "resume: the checkpoint's optimizer state is for optimizer.name=adamw, not sgd"),
    (["batch_size=4"], "resume: the checkpoint's run has 3 steps per epoch, this config 6"),
], ids=["model", "groups", "group-members", "num-classes", "optimizer", "batch-size"])
def test_resume_that_changes_the_model_or_groups_is_refused(straight, tmp_path, overrides, message):
    with pytest.raises(UserError) as info:
        train(compose_cfg(f"resume={straight}", *overrides), tmp_path / "refused")
    assert str(info.value).startswith(message)
    assert not (tmp_path / "refused").exists()  # refused before anything is written


@pytest.mark.parametrize("epochs", [2, 5])
def test_resume_with_other_epochs_is_refused_before_the_schedule_jumps(straight, tmp_path, epochs):
    with pytest.raises(UserError, match=r"resume: the checkpoint's run was planned with epochs=4; .* its LRs would "
                                        r"jump at the resumed step: resume with epochs=4"):
        train(compose_cfg(f"resume={straight}", f"epochs={epochs}"), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_resume_with_another_lr_warns_and_continues(straight, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune"):
        summary = train(compose_cfg(f"resume={straight}", "lr=0.003", "progress=true"), tmp_path / "again")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warnings = [w for w in warnings if w.startswith("resume:")]  # not the plan's (tests/test_inspect.py)
    assert warnings == ["resume: these settings differ from the checkpoint's run and apply from now on: "
                        "lr",  # resume= and progress= do not count
                        "resume: the checkpoint already finished all 4 epochs; nothing to train"]
    assert summary["epochs"] == 4
    assert read_csv(tmp_path / "again" / "lr_trace.csv") == read_csv(straight / "lr_trace.csv")  # finished already


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match=r"^resume: no checkpoint at .*/nowhere \(give a run directory"):
        train(compose_cfg(f"resume={tmp_path / 'nowhere'}"), tmp_path / "run")
    (tmp_path / "nowhere").mkdir()  # a directory without checkpoints/ is no better
    with pytest.raises(UserError, match=r"^resume: no checkpoint at .*nowhere/checkpoints/last.pt"):
        train(compose_cfg(f"resume={tmp_path / 'nowhere'}"), tmp_path / "run")


def test_a_weights_file_is_not_a_checkpoint(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 512)}, tmp_path / "weights.pt")
    with pytest.raises(UserError, match="is not a finetune checkpoint"):
        train(compose_cfg(f"resume={tmp_path / 'weights.pt'}"), tmp_path / "run")


def test_config_changes_lists_dotted_keys():
    old = {"lr": 1e-3, "epochs": 4, "schedule": {"kind": "cosine", "warmup": 0}, "resume": None,
           "per_group": {}}
    new = {"lr": 1e-3, "epochs": 6, "schedule": {"kind": "cosine", "warmup": 1}, "resume": "run",
           "per_group": {"head": {"lr": 0.1}}}
    assert checkpoint.config_changes(old, new) == ["epochs", "per_group.head.lr", "schedule.warmup"]


def test_resuming_in_place_cuts_the_streamed_trace_back_to_the_checkpoint(straight, tmp_path, monkeypatch):
    """lr_trace.csv is written as the run goes; rows of steps after the checkpoint (a kill between two
    checkpoints) are dropped when the run resumes in its own directory, so the trace stays exact."""
    real_save = files.atomic_save

    def keep_step4(obj, path):
        real_save(obj, path)
        if obj["step"] == 4:
            shutil.copy(path, tmp_path / "step4.pt")

    monkeypatch.setattr(files, "atomic_save", keep_step4)
    run = tmp_path / "run"
    train(compose_cfg("checkpoint_every=4"), run)
    monkeypatch.undo()
    shutil.copy(tmp_path / "step4.pt", run / "checkpoints" / checkpoint.LAST)  # as if killed after step 11
    assert {int(r["step"]) for r in read_csv(run / "lr_trace.csv")} == set(range(12))
    train(compose_cfg(f"resume={run}", "checkpoint_every=4"), run)
    assert_same_run(straight, run)  # the trace included: steps 0-3 kept, 4-11 written once more


def test_checkpoints_hold_no_trace_and_stay_the_same_size(tmp_path):
    """The LR trace lives in lr_trace.csv only: beyond the tensors (weights, optimizer state, RNG), a
    checkpoint after 4 epochs is as small as after 1 (a few metrics rows more)."""
    import io

    sizes = []
    for epochs in (1, 4):
        train(compose_cfg(f"epochs={epochs}"), tmp_path / str(epochs))
        saved = load(tmp_path / str(epochs))
        assert "trace" not in saved and saved["trace_file"] == str((tmp_path / str(epochs) / "lr_trace.csv").resolve())
        rest = io.BytesIO()
        torch.save({k: v for k, v in saved.items() if k not in ("model", "optimizer", "ema", "scaler", "rng")}, rest)
        sizes.append(rest.tell())
    assert sizes[0] < 20_000 and sizes[1] - sizes[0] < 2_000
