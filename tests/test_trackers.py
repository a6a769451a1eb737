"""Experiment trackers through their own libraries (finetune/engine/trackers.py): logger=mlflow into a local
MLflow store, logger=wandb offline, both at once; a run interrupted and resumed continues the same tracker
run with every step exactly once; a sweep is one MLflow parent run with a child per job, one W&B group.
Everything is read back from what the libraries wrote: MLflow's store through its client, W&B's offline
run files (RUN_DIR/wandb/offline-run-*/run-<id>.wandb) through its protobuf records."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from helpers import read_csv
from tiny_runs import QUIET, TINY, compose_cfg, run_cli

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint, trackers
from finetune.engine.signals import Interrupted

pytest.importorskip("mlflow", reason='the trackers extra: pip install -e ".[trackers]"')
pytest.importorskip("wandb", reason='the trackers extra: pip install -e ".[trackers]"')
from mlflow.tracking import MlflowClient  # noqa: E402

# MLflow's own use of SQLAlchemy
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
# 2 epochs of 3 steps, an evaluation every 2 steps: evaluations inside epochs and at their ends
PLAN = ["epochs=2", "eval_every=2"]


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its own files (settings, cache) under the test's tmp dir; never a login."""
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (about 6 s here), copied where a test's default store
    goes (<parent>/mlruns/mlflow.db) instead of being made again; our code creates the experiment in it."""
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store_in(parent: Path, empty_store: Path) -> None:
    (parent / "mlruns").mkdir(parents=True)
    shutil.copyfile(empty_store, parent / "mlruns" / "mlflow.db")


def mlflow_run(run_dir: Path):
    ids = json.loads((run_dir / trackers.RUN_FILE).read_text())["mlflow"]
    client = MlflowClient(ids["tracking_uri"])
    return client, client.get_run(ids["run_id"])


def history(client, run, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def head_trace(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["lr"])) for r in read_csv(run_dir / "lr_trace.csv") if r["group"] == "head"]


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B files (LevelDB's log format: 32 KiB blocks of chunks, each a
    7-byte header: crc, length, type), as wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunks = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunks += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
    return records


def wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every history row the W&B files hold, in the order written."""
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            # a key with a slash (lr/head) is stored as its parts
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append((record.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def wandb_runs(run_dir: Path) -> list:
    return [r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]


def test_mlflow_holds_every_groups_lr_the_params_tags_and_artifacts(tmp_path, empty_store):
    store_in(tmp_path, empty_store)
    run_dir, cfg = tmp_path / "run", compose_cfg(*PLAN, "logger=mlflow")
    # what finetune.compose records under experiment=auto (its probe is test_auto's)
    cfg.recipe = {"name": "lp_ft", "set": {}, "auto": {"recipe": "lp_ft", "reason": "the top features fit"}}
    train(cfg, run_dir)
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert json.loads((run_dir / trackers.RUN_FILE).read_text())["mlflow"]["tracking_uri"] == \
        f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"  # the default store, beside the run
    trace = head_trace(run_dir)
    lrs = history(client, run, "lr/head")
    assert [s for s, _ in lrs] == [s for s, _ in trace] == list(range(6))
    assert [v for _, v in lrs] == pytest.approx([v for _, v in trace])
    for group in ("stem", "layer1", "layer2", "layer3", "layer4"):
        assert len(history(client, run, f"lr/{group}")) == 6
    val = history(client, run, "val/acc")  # every evaluation at the index of the step before it
    assert [s for s, _ in val] == [int(r["step"]) - 1 for r in read_csv(run_dir / "evals.csv")] == [1, 2, 3, 5]
    assert [v for _, v in history(client, run, "epoch/val_acc")] == \
        pytest.approx([float(r["val_acc"]) for r in read_csv(run_dir / "metrics.csv")])
    assert history(client, run, "train/loss")
    params = run.data.params
    assert params["lr"] == "0.01" and params["model.name"] == "resnet18" and params["epochs"] == "2"
    assert params["logger.mlflow"] == "True" and not any(k.startswith("recipe") for k in params)
    tags = run.data.tags
    assert (tags["recipe"], tags["auto.choice"], tags["auto.reason"]) == ("lp_ft", "lp_ft", "the top features fit")
    assert tags["run_dir"] == str(run_dir.resolve())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "auto.json", "metrics.csv", "lr_trace.csv", "lr_trace.png", "evals.csv"} <= artifacts
    assert str(tmp_path / "mlruns" / "artifacts") in run.info.artifact_uri  # not in the working directory


def test_a_resumed_run_continues_the_same_tracker_runs_with_every_step_once(tmp_path, empty_store):
    """Stopped at step 2, resumed and stopped at 4, then resumed from a copy of the step-2 checkpoint: MLflow
    and W&B keep one run each, every step once (the third run sends none of the steps 2-3 they hold)."""
    store_in(tmp_path, empty_store)
    run_dir, plan = tmp_path / "run", [*PLAN, "logger=[mlflow,wandb]"]
    with pytest.raises(Interrupted):
        train(compose_cfg(*plan), run_dir, stop_at_step=2)
    first = json.loads((run_dir / trackers.RUN_FILE).read_text())
    client, run = mlflow_run(run_dir)
    assert run.info.status == "KILLED" and [s for s, _ in history(client, run, "lr/head")] == [0, 1]
    early = run_dir / "checkpoints" / "early.pt"
    shutil.copyfile(run_dir / "checkpoints" / checkpoint.LAST, early)
    with pytest.raises(Interrupted):
        train(compose_cfg(*plan, f"resume={run_dir}"), run_dir, stop_at_step=4)
    train(compose_cfg(*plan, f"resume={early}"), run_dir)

    ids = json.loads((run_dir / trackers.RUN_FILE).read_text())
    assert (ids["mlflow"]["run_id"], ids["wandb"]["id"]) == (first["mlflow"]["run_id"], first["wandb"]["id"])
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    trace = head_trace(run_dir)
    lrs = history(client, run, "lr/head")
    assert [s for s, _ in lrs] == list(range(6))  # once each
    assert [v for _, v in lrs] == pytest.approx([v for _, v in trace])
    assert [s for s, _ in history(client, run, "val/acc")] == [1, 2, 3, 5]
    assert [s for s, _ in history(client, run, "epoch/val_acc")] == [2, 5]

    # W&B: three offline run directories of one run id, whose rows hold every step once
    assert {r.run_id for r in wandb_runs(run_dir)} == {ids["wandb"]["id"]}
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 3
    rows = wandb_history(run_dir)
    head = [(step, values["lr/head"]) for step, values in rows if "lr/head" in values]
    assert [s for s, _ in head] == list(range(6))
    assert [v for _, v in head] == pytest.approx([v for _, v in trace])
    assert sorted(step for step, values in rows if "val/acc" in values) == [1, 2, 3, 5]
    assert {"summary.json", "lr_trace.csv"} <= {p.name for p in run_dir.glob("wandb/offline-run-*/files/*")}


def test_a_sweep_is_one_mlflow_parent_run_with_a_child_per_job(tmp_path, capsys, empty_store):
    sweep_dir = tmp_path / "sweep"
    store_in(sweep_dir, empty_store)
    code, err = run_cli(capsys, "train", "-m", *TINY, "epochs=1", "experiment=none", "unfreeze=1", "lr=0.01,0.02",
                        "logger=[mlflow,wandb]", *QUIET, f"hydra.sweep.dir={sweep_dir}")
    assert code == 0, err
    held = json.loads((sweep_dir / trackers.SWEEP_FILE).read_text())
    client = MlflowClient(held["mlflow"]["tracking_uri"])
    parent = client.get_run(held["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file())
    assert len(jobs) == len(children) == 2
    assert {c.info.run_id for c in children} == \
        {json.loads((job / trackers.RUN_FILE).read_text())["mlflow"]["run_id"] for job in jobs}
    assert sorted(c.data.params["lr"] for c in children) == ["0.01", "0.02"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert [[r.run_group for r in wandb_runs(job)] for job in jobs] == [["sweep"], ["sweep"]]  # W&B: one group


def test_logger_takes_several_trackers_from_one_config_group():
    from finetune.config import overrides

    overrides.check(["logger=[tensorboard,mlflow]"])
    cfg = compose_cfg("logger=[tensorboard,mlflow]")
    assert (cfg.logger.tensorboard, cfg.logger.mlflow, cfg.logger.wandb) == (True, True, False)
    assert not any(compose_cfg().logger[k] for k in ("tensorboard", "mlflow", "wandb"))
    with pytest.raises(UserError, match="logger=mlfow: no such logger config; choose one of mlflow, none, "
                                        "tensorboard, wandb"):
        overrides.check(["logger=[tensorboard,mlfow]"])


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    if package == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    logger = compose_cfg(f"logger={package}").logger
    with pytest.raises(UserError, match=rf'^logger={package} needs the {package} package: '
                                        r'pip install "finetune\[trackers\]"$'):
        trackers.trackers(logger, tmp_path / "run", 0, None, {}, None)


def test_points_a_tracker_refused_are_sent_at_the_next_checkpoint_and_none_twice(tmp_path, caplog):
    """A server down at one checkpoint: the run goes on, and the next checkpoint sends what is pending."""
    from finetune.engine.observers import StepView

    class Flaky(trackers.Tracker):
        name = "flaky"

        def __init__(self):
            super().__init__(tmp_path, None)
            self.sent, self.down = [], True

        def ids(self):
            return {}

        def send(self, points):
            if self.down:
                self.down = False
                raise ConnectionError("server down")
            self.sent += [(p.step, p.key) for p in points]

    flaky = Flaky()
    for step in range(4):
        flaky.step(StepView(step, 0, step + 1, [{"group": "head", "lr": 0.1 * step}]))
        if step in (1, 3):
            flaky.checkpoint(step + 1)
    assert "flaky: could not send its points (server down)" in caplog.text
    assert "flaky: the points up to step 1 wait for the next checkpoint" in caplog.text
    assert flaky.sent == [(s, "lr/head") for s in range(4)]
    assert json.loads((tmp_path / trackers.RUN_FILE).read_text())["flaky"]["last_sent"] == {"lr/head": 3}


def test_a_tracking_server_that_is_down_is_one_warning_and_training_goes_on(tmp_path, capsys):
    """Before: no training step in 240 s of urllib3 retries."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, "experiment=none", "epochs=1", "logger=mlflow",
                          f"logger.tracking_uri=http://127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, lines
    assert time.perf_counter() - t0 < 60
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert not (tmp_path / "run" / trackers.RUN_FILE).exists()


def test_a_file_store_uri_is_one_line_naming_the_fix(tmp_path, capsys):
    """Before: MLflow 3's MlflowException traceback."""
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, "experiment=none", "epochs=1", "logger=mlflow",
                          f"logger.tracking_uri=file://{tmp_path}/mlruns", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and lines == [f"finetune: error: logger.tracking_uri=file://{tmp_path}/mlruns: MLflow 3 keeps no "
                                   "file store; give an sqlite file instead, logger.tracking_uri=sqlite:///DIR/mlflow.db "
                                   "(or leave it unset: a store in the run's parent folder, mlruns/mlflow.db)"]


def test_an_sqlite_store_keeps_the_artifacts_beside_it(tmp_path, empty_store, monkeypatch, capsys):
    """Before: the artifacts went to ./mlruns of whatever directory the command ran in."""
    store = tmp_path / "tracking"
    store.mkdir()
    shutil.copyfile(empty_store, store / "mlflow.db")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, lines = run_cli(capsys, "train", *TINY, *QUIET, "experiment=none", "epochs=1", "logger=mlflow",
                          f"logger.tracking_uri=sqlite:///{store}/mlflow.db", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, lines
    assert list(cwd.iterdir()) == []
    assert any(p.name == "summary.json" for p in (store / "artifacts").rglob("*"))


def test_tensorboard_that_cannot_write_is_one_warning_and_training_goes_on(tmp_path, caplog, monkeypatch):
    """TensorBoard sits with the other trackers, behind the same guard: before, a writer's error ended the run."""
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    summary = train(compose_cfg("logger=tensorboard", "epochs=2"), tmp_path / "run")
    assert summary["status"] == "completed"
    warned = [r.getMessage() for r in caplog.records if "logger=tensorboard: could not write" in r.getMessage()]
    assert len(warned) == 1
