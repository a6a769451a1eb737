"""The command line end to end on CPU: train, inspect, multirun, errors, an installed wheel."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import read_csv

ROOT = Path(__file__).resolve().parent.parent
# tiny and fast: resnet18 at 32 px, random init, 2 synthetic classes, 3 steps an epoch
TINY = ["model=resnet18", "model.weights=null", "data=synthetic", "data.image_size=32", "data.num_classes=2",
        "data.train_size=48", "data.val_size=16", "batch_size=16", "progress=false"]


def finetune(*args, cwd, check=True, env=None, timeout=300):
    # timeout: a guard against a hung child, not a speed check (a loaded 2-core machine runs slowly)
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_help_lists_commands(tmp_path):
    out = finetune("--help", cwd=tmp_path).stdout
    assert "train" in out and "inspect" in out


@pytest.mark.slow
def test_train_writes_the_run_directory(tmp_path):
    finetune("train", *TINY, "epochs=2", "experiment=gradual", "lr=2e-3", "hydra.run.dir=run", cwd=tmp_path)
    run = tmp_path / "run"
    trace = read_csv(run / "lr_trace.csv")
    assert list(trace[0]) == ["step", "epoch", "group", "lr", "momentum", "trainable"]
    groups = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert len(trace) == 2 * 3 * len(groups)
    assert [r["group"] for r in trace[:6]] == groups
    # gradual: the head alone, then layer4 joins at epoch 1; the stem never trains in 2 epochs
    assert {r["trainable"] for r in trace if r["group"] == "stem"} == {"0"}
    assert [r["trainable"] for r in trace if r["group"] == "layer4"] == ["0"] * 3 + ["1"] * 3
    # ULMFiT spread: groups on the same schedule sit at head LR / 2.6**depth at every step
    by_step = {}
    for r in trace:
        by_step.setdefault(int(r["step"]), {})[r["group"]] = float(r["lr"])
    assert len(by_step) == 6
    for lrs in by_step.values():
        assert lrs["layer2"] == pytest.approx(lrs["layer3"] / 2.6, rel=1e-9)
        assert lrs["stem"] == pytest.approx(lrs["layer3"] / 2.6**3, rel=1e-9)
    assert by_step[3]["layer4"] == pytest.approx(2e-3 / 2.6 / 32)  # its slanted triangle starts at epoch 1
    metrics = read_csv(run / "metrics.csv")
    assert [m["epoch"] for m in metrics] == ["0", "1"]
    assert list(metrics[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "val_f1_macro",
                               "seconds", "images_per_s"]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("best_val_acc", "final_val_acc", "epochs", "wall_seconds", "train_images_per_second",
                "trainable_params_per_epoch"):
        assert key in summary
    assert summary["epochs"] == 2
    tp = summary["trainable_params_per_epoch"]
    assert tp[0] == 512 * 2 + 2 and tp[1] > tp[0]  # the head alone, then layer4 too
    assert (run / "lr_trace.png").stat().st_size > 1000
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert "fc.weight" in ckpt["model"] and ckpt["epoch"] == 2


@pytest.mark.slow
def test_multirun_makes_one_directory_per_job(tmp_path):
    finetune("train", "-m", *TINY, "epochs=1", "experiment=full", "unfreeze=1,3,all", "hydra.sweep.dir=sweep",
             cwd=tmp_path)
    dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(dirs) == 3
    tps = []
    for d in dirs:
        summary = json.loads((tmp_path / "sweep" / d / "summary.json").read_text())
        tps.append(summary["trainable_params_per_epoch"][0])
    assert len(set(tps)) == 3  # unfreeze=1, 3, all train different parameter counts


@pytest.mark.slow
def test_inspect_json_and_writes_nothing(tmp_path):
    out = finetune("inspect", *TINY, "epochs=4", "unfreeze=2", "freeze=gradual", "inspect.format=json",
                   "experiment=none", "schedule=cosine", "schedule.warmup=0", cwd=tmp_path).stdout
    info = json.loads(out)
    assert info["total_steps"] == 4 * 3
    names = [g["name"] for g in info["groups"]]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [g["trainable_from_epoch"] for g in info["groups"]] == [None, None, None, None, 1, 0]
    head = info["groups"][-1]
    assert head["params"] == 512 * 2 + 2
    assert head["lr"]["peak"] == pytest.approx(1e-3) and head["lr"]["end"] < head["lr"]["start"]
    assert set(info["groups"][0]) >= {"name", "params", "trainable_from_epoch", "lr", "weight_decay", "schedule"}
    assert info["batchnorm"] == "pretrained statistics in frozen groups, batch statistics in trainable ones"
    assert list(tmp_path.iterdir()) == []
    table = finetune("inspect", *TINY, "experiment=lp_ft", cwd=tmp_path).stdout
    assert "layer4" in table and "head" in table
    assert "BatchNorm: pretrained statistics in every layer (freeze.bn_eval)" in table


@pytest.mark.slow
def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    proc = finetune("train", *TINY, "unfreeze=9", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "finetune: error: unfreeze=9 is out of range: the model has 6 layer groups (use 1..6 or 'all')"]
    assert "Traceback" not in proc.stderr
    proc = finetune("train", *TINY, "experiment=none", "schedule.kind=cosin", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "schedule.kind: unknown value 'cosin'" in proc.stderr


@pytest.mark.slow
def test_schema_rejects_wrong_type_and_unknown_key(tmp_path):
    """One line naming the key and the closest names, exit 2 (Hydra's own: 6-21 lines, exit 1)."""
    proc = finetune("train", "epochs=many", "--cfg", "job", cwd=tmp_path, check=False)
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, ["finetune: error: epochs=many: Value 'many' of type 'str' could not be converted to Integer"])
    for typed in ("epoch=3", "+epoch=3"):
        proc = finetune("train", typed, "--cfg", "job", cwd=tmp_path, check=False)
        assert (proc.returncode, proc.stderr.splitlines()) == (
            2, ["finetune: error: unknown key 'epoch' (closest: epochs)"]), typed


@pytest.mark.slow
def test_per_group_settings_from_the_command_line(tmp_path):
    out = finetune("inspect", *TINY, "inspect.format=json", "experiment=none", "schedule=constant",
                   "+per_group.layer4.lr=0.01", "+per_group.head.schedule.kind=cosine", cwd=tmp_path).stdout
    groups = {g["name"]: g for g in json.loads(out)["groups"]}
    assert groups["layer4"]["lr"]["peak"] == pytest.approx(0.01)
    assert groups["head"]["schedule"]["kind"] == "cosine"
    assert groups["stem"]["schedule"]["kind"] == "constant"


@pytest.mark.slow
def test_installed_wheel_runs_from_any_directory(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("finetune-*.whl"))
    assert "finetune/conf/train.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = finetune("inspect", *TINY, "inspect.format=json", cwd=elsewhere, env={"PYTHONPATH": str(target)}).stdout
    assert json.loads(out)["groups"][-1]["name"] == "head"
    probe = subprocess.run([sys.executable, "-c", "import finetune.commands.cli as c; print(c.CONFIG_PATH)"], cwd=elsewhere,
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert probe.stdout.strip() == "pkg://finetune.conf"


@pytest.mark.slow
def test_tab_completion_sees_overrides_after_the_command(tmp_path):
    env = {"COMP_LINE": "finetune train sched"}
    out = finetune("-sc", "query=bash", cwd=tmp_path, env=env).stdout.split()
    assert "schedule=" in out
    out = finetune("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "finetune ins"}).stdout.split()
    assert out == ["train", "inspect", "lr-find", "eval", "predict", "export", "shard", "summarize", "config"]
    script = finetune("-sc", "install=bash", cwd=tmp_path).stdout
    assert "-F hydra_bash_completion finetune" in script


@pytest.mark.slow
def test_default_model_learns_the_embedded_data(tmp_path):
    """The default recipe (auto: a probe, then the recipe it chose) with the packaged ImageNet
    EfficientNet-Lite0 on the default data: accuracy rises well above chance."""
    finetune("train", "epochs=2", "data.train_size=96", "data.val_size=48",
             "data.image_size=128", "batch_size=16", "progress=false", "hydra.run.dir=run", cwd=tmp_path,
             timeout=1200)
    metrics = read_csv(tmp_path / "run" / "metrics.csv")
    assert float(metrics[1]["train_loss"]) < float(metrics[0]["train_loss"])
    assert float(metrics[-1]["val_acc"]) >= 0.6  # 10 digits: chance is 0.1
