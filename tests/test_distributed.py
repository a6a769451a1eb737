"""Several processes: `torchrun --standalone --nproc_per_node=2 -m finetune train ...` as a user types it,
2 gloo processes on the CPU with one thread each. Across a gradual unfreeze (with gradient accumulation,
so DDP's no_sync path runs too) every rank ends with bit-identical weights, equal within float rounding
to one process with the doubled batch; SIGTERM + resume equals the straight run bit for bit; a submitit
job of two tasks is one distributed run; the default recipe, auto, trains one choice on every rank."""

import json
import os
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
    compose_cfg,
    run_cli,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.data.sampling import EpochSampler, Shard
from finetune.engine import checkpoint

# its module-scoped fixture trains once: keep the module on one test worker (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_distributed")

# resnet18 at 16 px, 64 images: 8 global micro-batches of 8, 4 optimizer steps an epoch; groups
# unfreeze at epochs 1 and 2 (each a DDP rebuild); with a weight average; pretrained BatchNorm statistics throughout, so
# that one process with the doubled batch normalises the same way
RUN = ["model=resnet18", "model.weights=null", "data=synthetic", "data.image_size=16", "data.num_classes=2",
       "data.train_size=64", "data.val_size=10", "progress=false", "device=cpu", "experiment=none",
       "freeze=gradual", "epochs=3", "freeze.bn_eval=true", "accumulate=2", "ema_half_life=1", "checkpoint_every=2"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]


def torchrun(cwd: Path, *args: str, wait: bool = True):
    """`torchrun --standalone --nproc_per_node=2 -m finetune train RUN batch_size=4 <args>` in `cwd`."""
    with open(cwd / "stdout.txt", "a") as out, open(cwd / "stderr.txt", "a") as err:
        proc = subprocess.Popen([*TORCHRUN, "-m", "finetune", "train", *RUN, "batch_size=4", *args], cwd=cwd,
                                stdout=out, stderr=err, env={**os.environ, **ONE_THREAD_ENV})
    if wait:
        assert proc.wait(timeout=180) == 0, (cwd / "stderr.txt").read_text()[-3000:]
    return proc


def load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("straight")
    torchrun(cwd, "hydra.run.dir=run")
    return cwd / "run"


def test_every_rank_takes_its_slice_of_the_global_batch_one_process_would_take():
    world, b, size = 2, 4, 37  # 4 global batches of 8; the tail of 5 is dropped on both ranks
    one = EpochSampler(size, seed=3, batch_size=b * world)
    ranks = [EpochSampler(size, seed=3, batch_size=b, rank=r, world=world) for r in range(world)]
    for start in (0, 2):  # from the start, and resumed after 2 steps
        for s in (one, *ranks):
            s.set_epoch(5, start_step=start)
        single = [i for i, _ in one][: (size // (b * world) - start) * b * world]
        shards = [[i for i, _ in r] for r in ranks]
        assert [len(s) for s in shards] == [len(r) for r in ranks] == [(4 - start) * b] * world
        for step in range(4 - start):  # rank r's step s: the r-th half of the global batch s
            assert shards[0][step * b:(step + 1) * b] + shards[1][step * b:(step + 1) * b] == \
                single[step * b * world:(step + 1) * b * world]
    val = [list(Shard(10, r, 3)) for r in range(3)]
    assert sorted(sum(val, [])) == list(range(10)) and all(val)  # every val image once, on one rank


@pytest.mark.slow
def test_gradual_unfreeze_under_torchrun_keeps_replicas_equal_and_matches_one_process(straight, tmp_path):
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["images_per_step"] == 16
    fingerprints = summary["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # bit-identical replicas
    trainable = summary["trainable_params_per_epoch"]
    assert trainable == sorted(trainable) and len(set(trainable)) == 3  # two freeze changes, DDP rebuilt
    assert not list(straight.parent.glob("outputs"))  # rank 1 wrote no run directory of its own
    assert [p.name for p in straight.parent.iterdir() if p.is_dir()] == ["run"]

    ddp = load(straight)
    one = train(compose_cfg(*RUN, "batch_size=8"), tmp_path / "one")
    single = load(tmp_path / "one")
    assert one["epochs"] == summary["epochs"] == 3 and ddp["steps_per_epoch"] == single["steps_per_epoch"] == 4
    for name, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(read_csv(straight / "metrics.csv"), read_csv(tmp_path / "one" / "metrics.csv")):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-5
        assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-5 and a["val_acc"] == b["val_acc"]
    assert read_csv(straight / "lr_trace.csv") == read_csv(tmp_path / "one" / "lr_trace.csv")


@pytest.mark.slow
def test_sigterm_and_resume_under_torchrun_equal_the_straight_run_bit_for_bit(straight, tmp_path):
    proc = torchrun(tmp_path, "hydra.run.dir=run", wait=False)
    ckpt = tmp_path / "run" / "checkpoints" / checkpoint.LAST
    deadline = time.monotonic() + 120
    while not ckpt.exists():  # step 2's checkpoint: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert err.count("finetune: stopped by SIGTERM after") == 1, err[-3000:]  # rank 0 alone says it
    assert "resume with: torchrun <the same options> -m finetune train" in err
    stopped = load(tmp_path / "run")
    assert 0 < stopped["step"] < 12 and stopped["world_size"] == 2 and len(stopped["ranks"]) == 2
    torchrun(tmp_path, "hydra.run.dir=run", "resume=run")
    resumed, reference = load(tmp_path / "run"), load(straight)
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for name, tensor in reference["ema"]["model"].items():  # the weight average too
        assert torch.equal(resumed["ema"]["model"][name], tensor), name
    for a, b in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed["metrics"]] == \
        [{k: v for k, v in m.items() if k not in drop} for m in reference["metrics"]]
    assert read_csv(tmp_path / "run" / "lr_trace.csv") == read_csv(straight / "lr_trace.csv")

    # another number of processes cannot continue it exactly: refused, naming both
    with pytest.raises(UserError, match=r"had 2 process\(es\), this one has 1"):
        train(compose_cfg(*RUN, "batch_size=8", f"resume={tmp_path / 'run'}", "overwrite=true"), tmp_path / "x")


@pytest.mark.slow
def test_the_default_auto_under_torchrun_probes_once_and_every_rank_trains_its_choice(tmp_path):
    # the default recipe (no experiment=): rank 0 probes, the choice is broadcast
    args = [a for a in RUN if a != "experiment=none" and not a.startswith(("freeze", "accumulate", "ema", "check"))]
    with open(tmp_path / "log.txt", "w") as out:
        proc = subprocess.run([*TORCHRUN, "-m", "finetune", "train", *args, "batch_size=4", "epochs=2",
                               "hydra.run.dir=run"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **ONE_THREAD_ENV}, timeout=180)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert log.count("auto: chose experiment=") == 1  # said once, for the run
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    choice = json.loads((tmp_path / "run" / "auto.json").read_text())
    assert summary["recipe"]["name"] == choice["recipe"] and summary["world_size"] == 2
    fingerprints = summary["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # one recipe on both ranks


def test_what_does_not_work_across_processes_is_one_line(capsys, monkeypatch, tmp_path):
    with pytest.raises(UserError, match="sync_bn=true needs CUDA"):
        train(compose_cfg("sync_bn=true"), tmp_path / "a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, err = run_cli(capsys, "train", "-m", "lr=1e-3,1e-2", *QUIET)
    assert code == 2 and err == ["finetune: error: a sweep (-m) under torchrun would start every job in every "
                                 "process; sweep with a launcher whose jobs each run torchrun, or give each job "
                                 "several tasks (docs/guide/multi-gpu.md)"]
    monkeypatch.setenv("RANK", "2")
    code, err = run_cli(capsys, "train", *QUIET)
    assert code == 2 and "the rank must lie in [0, WORLD_SIZE)" in err[-1]


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_is_one_distributed_run(tmp_path):
    """hydra/launcher=submitit_local with tasks_per_node=2, as hydra/launcher=slurm runs a job per node."""
    out = subprocess.run([sys.executable, "-m", "finetune", "train", "-m", "hydra/launcher=submitit_local",
                          "hydra.launcher.tasks_per_node=2", *RUN[:10], "epochs=1", "eval_every=2", "batch_size=4",
                          "hydra.sweep.dir=sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ, **ONE_THREAD_ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "summary.json").is_file()]
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]


@pytest.mark.slow
def test_adapters_under_torchrun_join_the_ddp_rewrap_and_leave_the_base_alone(tmp_path):
    """peft=lora on every convolution under the gradual unfreeze: each freeze change rebuilds DDP with the
    adapters that now train (a parameter DDP did not register would drift between ranks without an error);
    both ranks end equal, with the base weights as they started."""
    import finetune
    from finetune.engine.setup import setup

    lora = ["peft=lora", "peft.target=conv"]
    torchrun(tmp_path, *lora, "hydra.run.dir=run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["replica_fingerprints"])) == 1
    start = dict(setup(finetune.compose([*RUN, "batch_size=4", *lora], probe=False), training=False)
                 .model.named_parameters())
    end = load(tmp_path / "run")["model"]
    assert all(torch.equal(start[n].detach(), end[n]) for n in start if ".lora_" not in n and not n.startswith("fc."))
    # layer3 and layer4 unfroze at epochs 2 and 1 (gradual): their adapters trained; layer1's never did
    moved = {n.split(".")[0] for n in start if ".lora_B." in n and not torch.equal(start[n].detach(), end[n])}
    assert moved == {"layer3", "layer4"}


@pytest.mark.slow
def test_ranks_that_see_other_data_stop_at_once_naming_the_rank_and_the_difference(tmp_path):
    """Rank 1 reads a folder with the same number of classes under other names (before: trained to the
    end without a word; with another count, DDP's traceback and a resume command for a checkpoint that
    did not exist)."""
    from PIL import Image

    for root, classes in (("a", ("ants", "bees")), ("b", ("ants", "wasps"))):
        for split in ("train", "val"):
            for name in classes:
                (tmp_path / root / split / name).mkdir(parents=True)
                for i in range(8):
                    Image.new("RGB", (16, 16), (30 * i, 90, 200)).save(tmp_path / root / split / name / f"{i}.png")
    args = [*RUN[:2], "data=imagefolder", "data.root='${oc.env:ROOT_${oc.env:RANK}}'", "data.image_size=16",
            "data.num_workers=0", "progress=false", "device=cpu", "experiment=none", "epochs=1", "batch_size=4"]
    env = {**os.environ, **ONE_THREAD_ENV, "ROOT_0": str(tmp_path / "a"), "ROOT_1": str(tmp_path / "b")}
    out = subprocess.run([*TORCHRUN, "-m", "finetune", "train", *args, "hydra.run.dir=run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("finetune: error:")]
    assert errors and all("rank 1 sees another class list than rank 0 (['ants', 'wasps'] against ['ants', 'bees'])"
                          in line for line in errors), out.stderr[-3000:]
    # torchrun's own traceback (ChildFailedError) follows a failed child; none comes from finetune or DDP
    assert "/finetune/" not in out.stderr.replace("-m finetune", "") and "DistBackendError" not in out.stderr, \
        out.stderr[-3000:]
    assert "resume with" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
