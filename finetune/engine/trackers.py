"""The experiment trackers a run logs to (logger=..., conf/logger/): TensorBoard (its files in the run),
MLflow and W&B, each an observer of the loop (finetune.engine.observers), on rank 0 alone.

MLflow and W&B keep whatever they are sent (neither can take a point back), so a resumed run must never
send a step twice. Their observers hold each point until the loop has written a checkpoint (`checkpoint`:
every checkpoint, at epoch ends, checkpoint_every, eval_every's best and an interruption), then send it:
the tracker never holds a step past the last checkpoint, and a run resumed from it continues the same
tracker run (its id in RUN_DIR/trackers.json, read from the run cfg.resume names) at the step after it.
trackers.json also keeps the last step sent of every metric: a resume from an older checkpoint
(resume=RUN/checkpoints/best.pt) sends none of the steps the tracker has already.

Under a sweep (-m) the Hydra callbacks (finetune.commands.hydra_callbacks) call `start_sweep`: one MLflow
parent run whose child is every job's run (SWEEP_FILE in the sweep directory names it), and W&B groups the
jobs by the sweep directory's name.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from finetune.base.errors import UserError, writing
from finetune.base.files import first_line
from finetune.config.recipe import flatten
from finetune.engine.observers import Observer

log = logging.getLogger("finetune")

RUN_FILE = "trackers.json"  # in a run directory: its MLflow and W&B run ids, and the last step sent of each metric
SWEEP_FILE = "trackers_sweep.json"  # in a sweep directory: MLflow's parent run, W&B's group
EXTRA = 'pip install "finetune[trackers]"'
BATCH = 1000  # points per request (MLflow's log_batch takes at most 1000)
REACH_SECONDS = 3  # how long a tracking server may take to accept a connection before the run goes on without it
ARTIFACTS = ("*.png", "*.csv", "summary.json", "auto.json")  # what the run directory gives the tracker at the end


@dataclass(frozen=True, order=True)
class Point:
    step: int  # the index of the step last done, as in lr_trace.csv (an evaluation after 6 steps: 5)
    key: str
    value: float
    time_ms: int


def trackers(logger, out_dir: Path, step: int, resumed_dir: Path | None, config: dict,
             recipe: dict | None) -> list[Observer]:
    """The trackers `logger` (cfg.logger) turns on, for the run in `out_dir` at `step`; `resumed_dir`: the
    run directory cfg.resume names, whose tracker runs this one continues."""
    found: list[Observer] = []
    if logger.tensorboard:
        found.append(TensorBoard(out_dir, step))
    if logger.mlflow or logger.wandb:
        ids = _read(resumed_dir / RUN_FILE) if resumed_dir else {}
        sweep = _read(out_dir.parent / SWEEP_FILE)
        if logger.mlflow:
            tracker = _reachable("mlflow", lambda: MLflow(logger, out_dir, ids.get("mlflow"), config, recipe,
                                                          sweep.get("mlflow")))
            found += [tracker] if tracker else []
        if logger.wandb:
            found.append(WandB(logger, out_dir, ids.get("wandb"), config, recipe, sweep.get("name")))
    return found


def _reachable(name: str, start):
    """The tracker `start()` makes, or None with one warning when its service cannot be reached: training
    goes on without it (its files in the run directory hold every metric). A wrong setting is a UserError."""
    try:
        return start()
    except UserError:
        raise
    except Exception as err:  # the library's or the network's error
        log.warning("logger=%s: could not start its run (%s); training goes on without it (metrics.csv, "
                    "lr_trace.csv and summary.json hold every figure)", name, first_line(err))
        return None


class TensorBoard(Observer):
    """logger=tensorboard: every group's LR at every step, the train loss and accuracy every CHECK_EVERY
    steps, every evaluation and the epochs' metrics, under RUN_DIR/tensorboard (rank 0). A resumed run
    purges what the interrupted one wrote after its checkpoint, so the curves do not fork."""

    def __init__(self, out_dir: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError('logger=tensorboard needs the tensorboard package: pip install "finetune[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=step or None)
        self.failed = False

    def _scalars(self, values: dict[str, float], x: int, flush: bool = False) -> None:
        """Written, or after a failure (a full disk) one warning and no more: never the run's end."""
        if self.failed:
            return
        try:
            for key, value in values.items():
                self.writer.add_scalar(key, value, x)
            if flush:
                self.writer.flush()
        except Exception as err:  # the writer's or the file system's error
            self.failed = True
            log.warning("logger=tensorboard: could not write (%s); training goes on without it", first_line(err))

    def step(self, view):
        values = {f"lr/{row['group']}": row["lr"] for row in view.rows}
        if view.running is not None:
            values.update({"train/loss": view.running[0], "train/acc": view.running[1]})
        self._scalars(values, view.step)

    # x is the index of the step last done, as in lr_trace.csv: an evaluation after 6 steps sits at 5,
    # so that a resume from that checkpoint (purging x >= 6) keeps it
    def evaluation(self, row):
        self._scalars({f"val/{k[4:]}": v for k, v in row.items() if k.startswith("val_")}, row["step"] - 1)

    def epoch_end(self, metrics, step):
        self._scalars({**{f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"},
                       **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")}}, step - 1, flush=True)

    def close(self):
        try:
            self.writer.close()
        except Exception as err:
            log.warning("logger=tensorboard: could not close its files (%s)", first_line(err))


class Tracker(Observer):
    """What MLflow and W&B share: the points held until a checkpoint, their ids in RUN_DIR/trackers.json."""

    name = ""  # the tracker's entry in trackers.json

    def __init__(self, out_dir: Path, saved: dict | None):
        self.out_dir = out_dir
        self.points: list[Point] = []
        self.last: dict[str, int] = dict((saved or {}).get("last_sent", {}))  # metric -> the last step it was sent
        self.ended = False

    # what a subclass does: its ids (for trackers.json), send points (sorted by step), the end, an interruption
    def ids(self) -> dict: ...
    def send(self, points: list[Point]) -> None: ...
    def finish(self, summary: dict, files: list[Path]) -> None: ...
    def abandon(self) -> None: ...

    def add(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.points += [Point(step, key, float(value), now) for key, value in values.items()]

    def step(self, view):
        values = {f"lr/{row['group']}": row["lr"] for row in view.rows}
        if view.running is not None:
            values.update({"train/loss": view.running[0], "train/acc": view.running[1]})
        self.add(view.step, values)

    def evaluation(self, row):
        self.add(row["step"] - 1, {f"val/{k[4:]}": v for k, v in row.items() if k.startswith("val_")})

    def epoch_end(self, metrics, step):
        self.add(step - 1, {**{f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"},
                            **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")}})

    def checkpoint(self, step):
        """Send what the checkpoint just written holds: everything observed so far."""
        if not self.send_pending():
            log.warning("%s: the points up to step %d wait for the next checkpoint", self.name, step - 1)
        self.write_ids()

    def send_pending(self) -> bool:
        """The points not sent yet, in batches: one the tracker refuses (a server down) stays for the next
        checkpoint, and none is sent twice. False when some are left."""
        pending = sorted(p for p in self.points if p.step > self.last.get(p.key, -1))

        def send():
            for start in range(0, len(pending), BATCH):
                batch = pending[start:start + BATCH]
                self.send(batch)
                self.last.update({p.key: p.step for p in batch})  # sorted by step: each key's last is its max

        done = self.guarded("send its points", send)
        self.points = [p for p in self.points if p.step > self.last.get(p.key, -1)]
        return done

    def guarded(self, what: str, action) -> bool:
        """Call the tracker's service: a failure (a server down) is a warning, never the run's end."""
        try:
            action()
            return True
        except Exception as err:  # any library's or network's error; the run's own files are complete
            log.warning("%s: could not %s (%s)", self.name, what, first_line(err))
            return False

    def write_ids(self) -> None:
        path = self.out_dir / RUN_FILE
        entries = _read(path)
        entries[self.name] = {**self.ids(), "last_sent": self.last}
        _write(path, entries)

    def end(self, metrics, summary):
        files = sorted({p for pattern in ARTIFACTS for p in self.out_dir.glob(pattern) if p.is_file()})
        self.send_pending()  # what an earlier checkpoint could not send
        self.write_ids()
        self.guarded("finish its run", lambda: self.finish(summary, files))
        self.ended = True

    def close(self):
        if not self.ended:  # interrupted or failed: what is held past the last checkpoint is dropped
            self.guarded("mark its run interrupted", self.abandon)


# ---------------------------------------------------------------------------------------------- MLflow


class MLflow(Tracker):
    """logger=mlflow: one MLflow run per run directory (a sweep's jobs: children of the sweep's run); the
    config flattened as params, the recipe and auto's choice as tags, the run's files as artifacts."""

    name = "mlflow"

    def __init__(self, logger, out_dir: Path, saved: dict | None, config: dict, recipe: dict | None,
                 sweep: dict | None):
        super().__init__(out_dir, saved)
        # the run resumed keeps its store unless the command line names another; a sweep's jobs share the sweep's
        uri = logger.tracking_uri or (saved or {}).get("tracking_uri") or (sweep or {}).get("tracking_uri")
        self.client, self.uri = mlflow_client(uri, out_dir.parent)
        self.run_id = self._continued(saved)
        if self.run_id is None:
            self.last = {}  # another tracker run: it holds nothing yet
            parent = (sweep or {}).get("parent_run_id") if (sweep or {}).get("tracking_uri") == self.uri else None
            tags = {**recipe_tags(recipe), "run_dir": str(out_dir.resolve()),
                    **({"mlflow.parentRunId": parent} if parent else {})}
            experiment = experiment_id(self.client, logger.experiment, self.uri, out_dir.parent)
            self.run_id = self.client.create_run(experiment, run_name=out_dir.name, tags=tags).info.run_id
            self._params(config)
        self.write_ids()

    def _continued(self, saved: dict | None) -> str | None:
        """The resumed run's MLflow run, running again; None when there is none (or not in this store)."""
        from mlflow.exceptions import MlflowException

        if not saved or saved.get("tracking_uri") != self.uri:
            if saved:
                log.warning("logger.tracking_uri=%s is not the store of the resumed run's MLflow run (%s): a new "
                            "MLflow run starts", self.uri, saved.get("tracking_uri"))
            return None
        try:
            self.client.update_run(saved["run_id"], status="RUNNING")
        except MlflowException as err:
            log.warning("the resumed run's MLflow run %s is not in %s (%s): a new one starts", saved["run_id"],
                        self.uri, first_line(err))
            return None
        return saved["run_id"]

    def _params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items() if k.split(".")[0] != "recipe"]
        for start in range(0, len(params), 100):  # MLflow's log_batch: at most 100 params
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def ids(self):
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def send(self, points):
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(p.key, p.value, p.time_ms, p.step) for p in points])

    def finish(self, summary, files):
        for key, value in recipe_tags(summary.get("recipe")).items():
            self.client.set_tag(self.run_id, key, value)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abandon(self):
        self.client.set_terminated(self.run_id, "KILLED")  # a resume sets it running again


def mlflow_client(uri: str | None, parent: Path):
    """(MLflow's client, its tracking URI): `uri`, or a local store in `parent` (parent/mlruns/mlflow.db)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"logger=mlflow needs the mlflow package: {EXTRA}") from None
    if not uri:
        (parent / "mlruns").mkdir(parents=True, exist_ok=True)
        uri = local_store(parent)
    check_uri(uri)
    # MLflow retries a refused HTTP request for minutes (7 tries, backoff 2) before it raises: a server that
    # is down would stall the run's start and every checkpoint. A setting of the user's own stays.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(uri), uri


def check_uri(uri: str) -> None:
    """A tracking URI MLflow can use: a file store (file:// or a plain folder), which MLflow 3 refuses with a
    traceback, is one line naming the key and the fix; an HTTP server is tried once, for a few seconds."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        raise UserError(f"logger.tracking_uri={uri}: MLflow 3 keeps no file store; give an sqlite file instead, "
                        "logger.tracking_uri=sqlite:///DIR/mlflow.db (or leave it unset: a store in the run's parent "
                        "folder, mlruns/mlflow.db)")
    if scheme in ("http", "https"):
        parsed = urlparse(uri)
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=REACH_SECONDS).close()
        except OSError as err:
            raise ConnectionError(f"{uri} cannot be reached: {err.strerror or err}") from None


def local_store(parent: Path) -> str:
    """The tracking URI of the local store in `parent`: an sqlite file (MLflow 3 leaves plain files behind)."""
    return f"sqlite:///{(parent / 'mlruns' / 'mlflow.db').resolve()}"


def experiment_id(client, name: str, uri: str, parent: Path) -> str:
    """The id of MLflow experiment `name`, created if new: in an sqlite store with its artifacts beside it
    (the default store: parent/mlruns/artifacts), not in the working directory."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = None
    if uri.startswith("sqlite:///"):  # artifacts beside the sqlite file (MLflow's default: ./mlruns of the cwd)
        local = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=local)
    except MlflowException:  # another job of the sweep created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def recipe_tags(recipe: dict | None) -> dict[str, str]:
    """The recipe a run trained and, under experiment=auto, its choice and reason."""
    tags = {"recipe": recipe["name"] if recipe else "none"}
    auto = (recipe or {}).get("auto")
    if auto:
        tags.update({"auto.choice": str(auto.get("recipe")), "auto.reason": str(auto.get("reason", ""))[:5000]})
    return tags


def start_sweep(logger, sweep_dir: Path) -> None:
    """When a sweep starts (-m): SWEEP_FILE in `sweep_dir`, naming the sweep (W&B's group) and, with
    logger=mlflow, its MLflow parent run (a sweep started again in its directory keeps its run)."""
    if not (logger.mlflow or logger.wandb):
        return
    path = sweep_dir / SWEEP_FILE
    info = {**_read(path), "name": sweep_dir.name}
    if logger.mlflow:
        _reachable("mlflow", lambda: _start_parent(logger, sweep_dir, info))
    _write(path, info)


def _start_parent(logger, sweep_dir: Path, info: dict) -> None:
    """The sweep's MLflow parent run (a sweep started again in its directory keeps its run), into `info`."""
    client, uri = mlflow_client(logger.tracking_uri, sweep_dir)
    held = info.get("mlflow") or {}
    if held.get("tracking_uri") == uri:
        client.update_run(held["parent_run_id"], status="RUNNING")
    else:
        experiment = experiment_id(client, logger.experiment, uri, sweep_dir)
        parent = client.create_run(experiment, run_name=sweep_dir.name, tags={"sweep_dir": str(sweep_dir.resolve())})
        info["mlflow"] = {"tracking_uri": uri, "parent_run_id": parent.info.run_id}


def end_sweep(sweep_dir: Path) -> None:
    """When the sweep ends: its summary (summary.csv, .md, .png) as the parent run's artifacts, the parent
    run finished."""
    held = _read(sweep_dir / SWEEP_FILE).get("mlflow")
    if not held:
        return

    def finish():
        client, _ = mlflow_client(held["tracking_uri"], sweep_dir)
        for path in sorted(sweep_dir.glob("summary.*")):
            client.log_artifact(held["parent_run_id"], str(path))
        client.set_terminated(held["parent_run_id"], "FINISHED")

    _reachable("mlflow", finish)


# ------------------------------------------------------------------------------------------------- W&B


class WandB(Tracker):
    """logger=wandb: one W&B run per run directory, its files in RUN_DIR/wandb; offline (for `wandb sync`)
    unless WANDB_API_KEY is set or logger.mode says otherwise. A sweep's jobs share a group."""

    name = "wandb"

    def __init__(self, logger, out_dir: Path, saved: dict | None, config: dict, recipe: dict | None,
                 group: str | None):
        super().__init__(out_dir, saved)
        try:
            import wandb
        except ImportError:
            raise UserError(f"logger=wandb needs the wandb package: {EXTRA}") from None
        project = logger.project or logger.experiment
        run_id = saved["id"] if saved and saved.get("project") == project else None
        if run_id is None:
            self.last = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        tags = [f"{key}:{value}"[:64] for key, value in recipe_tags(recipe).items() if key != "auto.reason"]
        self.run = wandb.init(project=project, dir=str(out_dir), id=run_id, resume="allow" if run_id else None,
                              name=out_dir.name, group=group, tags=tags, mode=wandb_mode(logger.mode),
                              config=None if run_id else config, settings=wandb.Settings(console="off"))
        self.project = project
        self.write_ids()

    def ids(self):
        return {"id": self.run.id, "project": self.project}

    def send(self, points):
        by_step: dict[int, dict] = {}
        for p in points:
            by_step.setdefault(p.step, {})[p.key] = p.value
        for step, values in sorted(by_step.items()):
            self.run.log(values, step=step)

    def finish(self, summary, files):
        self.run.summary.update({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for path in files:
            self.run.save(str(path), base_path=str(self.out_dir), policy="now")
        self.run.finish()

    def abandon(self):
        self.run.mark_preempting()  # resumable: a resume continues it
        self.run.finish(exit_code=1)


def wandb_mode(mode) -> str | None:
    """logger.mode, else WANDB_MODE's (None: wandb reads it), else online with an API key and offline without."""
    if mode is not None:
        return str(mode)
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


# ----------------------------------------------------------------------------------------------- files


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet (or cut short by a kill mid-write: a new tracker run then)
        return {}


def _write(path: Path, obj: dict) -> None:
    """Written to a temporary file, then renamed over `path`: a kill never leaves half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
