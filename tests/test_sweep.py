"""Sweeps: a failing job does not end the sweep; the sweep's summary (csv, md, png) agrees with its jobs;
`finetune summarize`; the real Hydra plugins (joblib, submitit_local, optuna) on tiny CPU runs; the
resume command printed inside a sweep job works when pasted into a shell."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import read_csv
from tiny_runs import ONE_THREAD_ENV, TINY, run_cli

from finetune.commands import cli
from finetune.engine import checkpoint

# its module-scoped fixture trains once: keep the module on one test worker (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_sweep")

RUN = [*TINY, "epochs=1", "experiment=none", "unfreeze=1", "schedule=constant"]


def finetune(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD_ENV, **(env or {})}, timeout=600)


def jobs_by_number(sweep_dir: Path) -> dict[int, Path]:
    return {json.loads((d / "job.json").read_text())["num"]: d for d in sweep_dir.iterdir() if (d / "job.json").is_file()}


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """3 jobs, the middle one with an invalid LR: (process, sweep dir)."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = finetune("train", "-m", *RUN, "epochs=2", "lr=1e-3,-1,1e-2", "hydra.sweep.dir=sweep", cwd=cwd)
    return proc, cwd / "sweep"


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_next_jobs_run(failing_sweep):
    proc, sweep_dir = failing_sweep
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"finetune: 1 of 3 jobs failed; summary in {sweep_dir.name}/summary.md"
    assert "finetune: job 1 failed: lr must be a finite number > 0, got -1.0" in lines
    assert "Traceback" not in proc.stderr
    jobs = jobs_by_number(sweep_dir)
    assert sorted(jobs) == [0, 1, 2]
    for num in (0, 2):  # the job after the failing one ran to the end
        assert json.loads((jobs[num] / "summary.json").read_text())["status"] == "completed"
    failed = json.loads((jobs[1] / "summary.json").read_text())
    assert failed == {"status": "failed", "reason": "lr must be a finite number > 0, got -1.0"}
    assert "UserError: lr must be a finite number > 0" in (jobs[1] / "error.log").read_text()  # the traceback, for a report


@pytest.mark.slow
def test_summary_csv_agrees_with_every_job(failing_sweep):
    _, sweep_dir = failing_sweep
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["job"] for r in rows][-1] == "1"  # failed last; completed ones by final val acc, best first
    done = [float(r["final_val_acc"]) for r in rows[:2]]
    assert done == sorted(done, reverse=True)
    jobs = jobs_by_number(sweep_dir)
    for row in rows:
        summary = json.loads((jobs[int(row["job"])] / "summary.json").read_text())
        assert row["status"] == summary["status"]
        assert row["overrides"] == f"lr={['0.001', '-1', '0.01'][int(row['job'])]}"  # the swept key alone
        assert {"model=resnet18", "epochs=2", row["overrides"]} <= set(row["all_overrides"].split())
        for field in ("final_val_acc", "best_val_acc", "final_val_loss", "wall_seconds"):
            assert (float(row[field]) if row[field] else None) == summary.get(field), field
        assert (float(row["images_per_s"]) if row["images_per_s"] else None) == summary.get("train_images_per_second")
        assert row["reason"] == summary.get("reason", "")
        assert row["recipe"] == ("none" if summary["status"] == "completed" else "")  # experiment=none
    md = (sweep_dir / "summary.md").read_text()
    assert "| 1 | lr=-1 | failed |  |" in md and "lr must be a finite number > 0, got -1.0" in md
    assert (sweep_dir / "summary.png").stat().st_size > 10_000


def test_the_summary_names_the_recipe_auto_chose_for_each_job():
    from finetune.commands.sweep import recipe_cell

    assert recipe_cell({"recipe": {"name": "full", "set": {}, "auto": {"recipe": "full"}}}) == "full (auto)"
    assert recipe_cell({"recipe": {"name": "lp_ft", "set": {}}}) == "lp_ft"
    assert recipe_cell({"recipe": None}) == "none" and recipe_cell({"status": "failed"}) == ""


@pytest.mark.slow
def test_summarize_rebuilds_a_partly_finished_sweep(failing_sweep, tmp_path, capsys):
    _, sweep_dir = failing_sweep
    partial = tmp_path / "partial"
    for num, job_dir in jobs_by_number(sweep_dir).items():  # a copy in which job 2 was killed before an epoch ended
        copy = partial / job_dir.name
        copy.mkdir(parents=True)
        for name in ("job.json", "metrics.csv", "summary.json") if num != 2 else ("job.json",):
            if (job_dir / name).is_file():
                (copy / name).write_bytes((job_dir / name).read_bytes())
    code, err = run_cli(capsys, "summarize", str(partial))
    assert code == 1
    # job 2 never finished an epoch and its process (the sweep's) is gone: interrupted, resumed by a rerun
    assert err[-1] == f"finetune: 2 of 3 jobs did not complete (failed, interrupted); summary in {partial}/summary.md"
    rows = read_csv(partial / "summary.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed"), ("2", "interrupted")]
    assert run_cli(capsys, "summarize", str(tmp_path / "nowhere"))[0] == 2


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_with_a_share_of_the_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch would take every core
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", "-m", *RUN, "lr=1e-3,1e-2",
                           "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    for job_dir in jobs_by_number(tmp_path / "sweep").values():
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["torch_threads"] == cli.threads_per_job(2, cores) == max(1, cores // 2)
    assert [r["status"] for r in read_csv(tmp_path / "sweep" / "summary.csv")] == ["completed"] * 2


def test_threads_per_job_shares_the_cores():
    assert cli.threads_per_job(2, 16) == 8
    assert cli.threads_per_job(3, 16) == 5
    assert cli.threads_per_job(10, 2) == 1  # more jobs than cores: one thread each
    assert cli.threads_per_job(-1, 8) == 1  # joblib's -1: a job per core
    assert cli.threads_per_job(-2, 9) == 1 and cli.threads_per_job(-7, 8) == 4  # -7 on 8 cores: 2 jobs


@pytest.mark.slow
def test_submitit_local_runs_a_sweep(tmp_path):
    proc = finetune("train", "-m", *RUN, "lr=1e-3,1e-2", "hydra/launcher=submitit_local",
                    "hydra.launcher.timeout_min=10", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(r["overrides"] for r in rows) == ["lr=0.001", "lr=0.01"]
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert list((tmp_path / "sweep").glob(".submitit/*/*_result.pkl"))  # it went through submitit's executor


@pytest.mark.slow
def test_optuna_study_best_value_is_the_best_job(tmp_path):
    proc = finetune("train", *RUN, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweep.dir=study",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study = yaml.safe_load((tmp_path / "study" / "optimization_results.yaml").read_text())
    rows = read_csv(tmp_path / "study" / "summary.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    assert study["best_value"] == max(float(r["final_val_acc"]) for r in rows) == float(rows[0]["final_val_acc"])
    trials = [dict(o.split("=", 1) for o in r["all_overrides"].split()) for r in rows]
    assert all({"lr", "head_lr", "unfreeze", "optimizer.weight_decay"} <= set(t) for t in trials)
    # the study's best trial is a row with the best value (ties possible on tiny data)
    assert any(float(t["lr"]) == study["best_params"]["lr"] and float(r["final_val_acc"]) == study["best_value"]
               for t, r in zip(trials, rows))


def test_a_missing_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_joblib") else real(name, *a))
    code, err = run_cli(capsys, "train", "-m", "lr=1e-3,1e-2", "hydra/launcher=joblib")
    assert code == 2
    assert err == ["finetune: error: hydra/launcher=joblib needs the Hydra plugin hydra-joblib-launcher, which is "
                   'not installed: pip install "finetune[sweep]" (or pip install hydra-joblib-launcher)']


@pytest.mark.parametrize("value", ["plain/dir-1.x", "sweep/0_lr=0.01,unfreeze=2", "a b/ç é", "it's", "[x]"])
def test_hydra_quote_reads_back_as_the_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"resume={cli.hydra_quote(value)}")
    assert override.value() == value


@pytest.mark.slow
def test_the_resume_command_of_a_sweep_job_works_pasted_into_a_shell(tmp_path):
    """SIGTERM a sweep job whose directory holds `=`, `,`, a space and non-ASCII; run the printed line in bash."""
    long_run = [*TINY, "epochs=8", "experiment=none", "unfreeze=1", "schedule=cosine"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "train", "-m", *long_run, "lr=1e-3",
                                 "hydra.sweep.dir='my sweep é'"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **ONE_THREAD_ENV})
    sweep_dir = tmp_path / "my sweep é"
    deadline = time.monotonic() + 120
    while not (saved := list(sweep_dir.glob(f"*/checkpoints/{checkpoint.LAST}"))):  # epoch 0 is done
        assert proc.poll() is None and time.monotonic() < deadline, "the job never wrote a checkpoint"
        time.sleep(0.02)
    job_dir = saved[0].parent.parent
    assert "=" in job_dir.name and "," in job_dir.name
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    line = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    command = line.removeprefix("finetune: resume with: ")
    assert command != line and shlex.split(command)[-2:] == [f"resume={cli.hydra_quote(str(job_dir))}",
                                                             f"hydra.run.dir={cli.hydra_quote(str(job_dir))}"]
    bin_dir = Path(sys.executable).parent  # where `finetune` is installed beside this python
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert "resumed from" in (job_dir / "finetune.log").read_text()
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["epochs"] == 8 and summary["status"] == "completed"


def test_the_slurm_preset_composes_for_submitit():
    from hydra import compose, initialize_config_dir
    from tiny_runs import ROOT

    from finetune.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min,
            launcher.array_parallelism) == ("gpu", 1, 1, 240, 16)


def test_a_second_sweep_into_a_sweep_dir_in_use_is_refused(tmp_path, capsys):
    from tiny_runs import QUIET, run_cli

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / ".finetune-sweep.lock").write_text(str(os.getppid()))  # a live process holds it
    code, err = run_cli(capsys, "train", "-m", *RUN, "epochs=1", "lr=1e-3,1e-2", *QUIET, f"hydra.sweep.dir={sweep_dir}")
    assert code == 2 and err[-1] == (f"finetune: error: {sweep_dir} is in use by another sweep (process "
                                     f"{os.getppid()}); wait for it, or choose another directory (hydra.sweep.dir=...)")
    assert [p.name for p in sweep_dir.iterdir()] == [".finetune-sweep.lock"]  # nothing written


def test_rerunning_a_finished_sweep_into_its_dir_keeps_each_job_and_rewrites_nothing(tmp_path, capsys):
    from tiny_runs import QUIET, run_cli

    args = ["train", "-m", *RUN, "epochs=1", "lr=1e-3,1e-2", *QUIET, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    # every file of the jobs' run directories (the sweep's own summary and Hydra's multirun.yaml are the sweep's)
    files = {p: p.read_bytes() for p in (tmp_path / "sweep").glob("*/**/*") if p.is_file()}
    assert sum(p.name == "summary.json" for p in files) == 2
    code, err = run_cli(capsys, *args)
    assert code == 0 and sum("completed before; kept" in line for line in err) == 2, err
    assert {p: p.read_bytes() for p in files} == files  # every job's summary.json still says completed
    assert not (tmp_path / "sweep" / ".finetune-sweep.lock").exists()


def test_jobs_that_trained_the_same_plan_are_flagged(tmp_path, capsys):
    """`-m unfreeze=1,all epochs=1` under lp_ft trains the head alone in both jobs: equal LR traces, and the
    summary says the overrides changed nothing."""
    from finetune.commands import sweep

    head_only = "step,epoch,group,lr\n0,0,head,0.01\n"
    traces = {"0_unfreeze=1": head_only, "1_unfreeze=all": head_only, "2_lr=0.1": head_only.replace("0.01", "0.1")}
    for num, (name, trace) in enumerate(traces.items()):
        job = tmp_path / name
        job.mkdir()
        sweep.write_job_file(job, num, [name.split("_", 1)[1]])
        (job / "summary.json").write_text(json.dumps({"status": "completed", "final_val_acc": 0.5}))
        (job / "lr_trace.csv").write_text(trace)
        (job / "metrics.csv").write_text(f"epoch,val_acc\n0,{0.5 + num / 10}\n")
    rows = sweep.summarize(tmp_path)
    assert sweep.identical(rows) == [[0, 1]]
    assert "Jobs 0, 1 trained the same plan" in (tmp_path / "summary.md").read_text()
    assert "finetune: jobs 0, 1 trained the same plan" in capsys.readouterr().err
    # one epoch each: a bar per job on a 0..1 axis (not three dots on an axis from -0.045 to 0.045), the
    # repeat named
    ax = sweep.summary_figure(tmp_path, rows).axes[0]
    assert [round(bar.get_width(), 2) for bar in ax.patches] == [0.5, 0.6, 0.7] and ax.get_xlim() == (0, 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "0: unfreeze=1", "1: unfreeze=all (= job 0's plan)", "2: lr=0.1"]


@pytest.mark.slow
def test_a_killed_sweep_lists_every_job_and_a_rerun_resumes_the_dead_one(tmp_path):
    """kill -9 of the sweep while job 1 trains: summarize lists job 0 completed, job 1 interrupted, jobs 2
    and 3 not started (before: 2 of 4 jobs, job 1 'running'); the same command again keeps job 0, resumes
    job 1 from its checkpoint and runs jobs 2 and 3 (before: job 1 refused, then both running and failed)."""
    args = ["train", "-m", *TINY, "epochs=12", "experiment=none", "unfreeze=1", "schedule=constant",
            "lr=1e-3,2e-3,3e-3,4e-3", "hydra.sweep.dir=sweep"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, **ONE_THREAD_ENV})
    sweep_dir, deadline = tmp_path / "sweep", time.monotonic() + 240
    while not any((d / "job.json").is_file() and json.loads((d / "job.json").read_text())["num"] == 1
                  and (d / "checkpoints" / checkpoint.LAST).is_file() for d in sweep_dir.glob("*")):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-2000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    out = finetune("summarize", "sweep", cwd=tmp_path)
    assert out.returncode == 1
    rows = {int(r["job"]): r["status"] for r in read_csv(sweep_dir / "summary.csv")}
    assert rows == {0: "completed", 1: "interrupted", 2: "not started", 3: "not started"}, out.stderr
    jobs = jobs_by_number(sweep_dir)
    kept = {p: p.read_bytes() for p in jobs[0].rglob("*") if p.is_file()}
    again = finetune(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 0 completed before; kept" in again.stderr and "job 1 resumes" in again.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    assert "resumed from" in (jobs[1] / "finetune.log").read_text()
    rows = {int(r["job"]): r["status"] for r in read_csv(sweep_dir / "summary.csv")}
    assert rows == dict.fromkeys(range(4), "completed")


def test_the_summary_ranks_jobs_by_their_best_metric(tmp_path):
    """val_loss goes down: the job with the lowest loss first (before: always by the final val accuracy)."""
    from finetune.commands import sweep

    for num, (loss, acc) in enumerate([(0.9, 0.95), (0.2, 0.60), (0.5, 0.80)]):
        job = tmp_path / f"{num}_lr={num}"
        sweep.write_job_file(job, num, [f"lr={num}"])
        (job / "summary.json").write_text(json.dumps({
            "status": "completed", "final_val_acc": acc, "best": {"metric": "val_loss", "value": loss}}))
    assert [r["job"] for r in sweep.collect(tmp_path)] == [1, 2, 0]
