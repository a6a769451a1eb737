"""Command line: `finetune train <hydra overrides>` and `finetune inspect <hydra overrides>`.

After the subcommand everything is Hydra (overrides, --cfg job, --help, -m multirun, completion).
User errors print one line and exit with code 2 (set verbose=true for the traceback too). SIGINT/SIGTERM
stop training after the current step with a checkpoint and the command that resumes, exit 128 + signal
(time_limit: the same, exit 3).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.base.errors import UserError
from finetune.config.presets import SOURCE_CONF
from finetune.config.schema import register_configs

USAGE = """usage: finetune <command> [hydra overrides...]

Fine-tune pretrained vision models: layer groups, freezing, per-group LR schedules.

commands:
  train     fine-tune as configured (e.g. finetune train model=resnet18 unfreeze=5)
  lr-find   the LR range test, aware of layer groups: lr_find.png and the lr= to pass
            (e.g. finetune lr-find model=resnet18 data=imagefolder data.root=DIR)
  inspect   print the layer groups, what trains when and every group's LR plan; trains nothing
            (inspect.format=json for JSON)
  summarize DIR  rebuild a sweep's summary.csv, summary.md and summary.png (also of an unfinished one)
  eval      score a trained model: finetune eval ckpt=RUN_DIR [split=val|train|test] [data.root=DIR] [tta=true]
  predict   top-k classes per image: finetune predict ckpt=RUN_DIR input=DIR|FILE|GLOB [out=predictions.csv]
  export    finetune export ckpt=RUN_DIR format=onnx|torchscript|safetensors [out=DIR]
  shard     an ImageFolder as webdataset tar shards for data=webdataset:
            finetune shard data.root=DIR out=SHARDS_DIR [shard_size=1000] [max_side=null]
  config    print the config a command line trains, its recipe applied: finetune config [overrides...]

`finetune <command> --help` lists its keys with what each does. After train, inspect and lr-find the
overrides are Hydra's: `finetune train -m unfreeze=1,3,all` sweeps; `--hydra-help` shows Hydra's options.
Tab completion: eval "$(finetune -sc install=bash)"
"""
# the keys most runs set, shown by `finetune train --help` (every key: --help-all)
COMMON_KEYS = ("unfreeze", "epochs", "lr", "batch_size", "seed", "device", "precision", "resume", "model.name",
               "model.weights", "data.root", "data.image_size", "freeze.kind", "schedule.kind", "lr_spread.kind",
               "per_group", "head_lr", "ema_half_life", "patience", "time_limit", "overwrite")

# conf/ sits next to the package in a checkout; a wheel ships it as the package finetune.conf
CONFIG_PATH = str(SOURCE_CONF) if (SOURCE_CONF / "train.yaml").is_file() else "pkg://finetune.conf"
INSPECT_OVERRIDES = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                     "hydra/hydra_logging=none"]

log = logging.getLogger("finetune")


def _report_user_error(cfg: DictConfig, err: Exception) -> None:
    """One line on stderr and exit 2; verbose=true prints the traceback above that line. Under torchrun
    the other ranks' lines say which rank they come from (an unreadable image sits in one rank's shard)."""
    if cfg.get("verbose"):
        traceback.print_exception(err)
    message = " ".join(str(err).split("\n"))  # one line, even for a message that slipped a newline in
    world = _world()
    where = f"[rank {world.rank}] " if not world.main else ""
    print(f"finetune: error: {where}{message}", file=sys.stderr)
    sys.exit(2)


def _world():
    from finetune.engine import distributed

    try:
        return distributed.from_env()
    except UserError:
        return distributed.SINGLE


def hydra_quote(value: str) -> str:
    """`value` as one quoted string of Hydra's override grammar, which would otherwise read `,` as a sweep
    and `=`, spaces or brackets as syntax (sweep job directories are named `3_lr=0.01,unfreeze=2`)."""
    if re.fullmatch(r"[\w./\-+@:%]+", value, re.ASCII):
        return value  # reads back as itself unquoted
    # inside single quotes only the quote itself and backslashes right before a quote need escaping
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def _resume_command(out_dir: str) -> str:
    """The command line that continues this run in its own directory, ready to paste into a shell: its
    overrides, resume= and hydra.run.dir= pointing at that directory (under torchrun: with the same
    torchrun options, which finetune cannot see)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "+resume="))]
    here = hydra_quote(out_dir)
    command = shlex.join(["finetune", "train", *overrides, f"resume={here}", f"hydra.run.dir={here}"])
    if _world().enabled:
        return command.replace("finetune train", "torchrun <the same options> -m finetune train", 1)
    return command


def _resolve(cfg: DictConfig, probe: bool = True) -> DictConfig:
    """The config Hydra composed for this command line, its recipe resolved (finetune.commands.compose):
    the one composition path the command line and finetune.compose share."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from finetune.commands.compose import resolve

    hydra_cfg = HydraConfig.get()
    return resolve(cfg, list(hydra_cfg.overrides.task),
                   lambda overrides: compose(hydra_cfg.job.config_name, overrides=list(overrides)),
                   hydra_cfg.runtime.choices.get("experiment"), probe=probe)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def train_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from finetune.commands.compose import recipe_of
    from finetune.commands.train import train
    from finetune.config.recipe import line
    from finetune.engine import checkpoint
    from finetune.engine.signals import Interrupted

    hydra_cfg = HydraConfig.get()
    out_dir = hydra_cfg.runtime.output_dir
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    _submitit_ranks()
    world = _world()
    level = log.level
    if not world.main:
        log.setLevel(logging.ERROR)  # rank 0 logs for the run; the others' warnings would repeat its own
    _share_cores(hydra_cfg)
    composed, started = cfg, []

    def on_start():  # every check passed: from here on this command's run owns the directory
        started.append(True)
        HELD_RUN.write(composed, hydra_cfg, Path(out_dir))

    try:
        out_dir = _join_processes(cfg, out_dir)
        if in_sweep and not cfg.resume and not cfg.overwrite and checkpoint.holds_run(Path(out_dir)):
            cfg, kept = _rerun_job(cfg, Path(out_dir), hydra_cfg.job.num)
            if kept is not None:
                return kept
        checkpoint.refuse_used_dir(Path(out_dir), cfg)  # before the probe runs or anything is written
        if cfg.auto.enabled:
            log.info("%s", line({"name": "auto"}))
        cfg = _resolve(cfg)
        log.info("%s", line(recipe_of(cfg)))
        summary = train(cfg, out_dir, on_start=on_start)
    except Interrupted as stop:
        if world.main:
            print(f"finetune: {stop.reason}\nfinetune: resume with: {_resume_command(out_dir)}", file=sys.stderr)
        sys.exit(stop.exit_code)  # 128 + signal (the shell's convention), or 3 for the time limit
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while stopping
        print("finetune: interrupted; stopped at once (a checkpoint written before is kept)", file=sys.stderr)
        sys.exit(130)
    except checkpoint.RunDirInUse as err:
        if not in_sweep:
            _report_user_error(cfg, err)
        # the directory is another run's: say so, and write nothing there
        print(f"finetune: job {hydra_cfg.job.num} refused: {' '.join(str(err).split())}", file=sys.stderr)
        return float("nan")
    except Exception as err:
        if world.enabled and _peer_lost(err):  # another rank died: gloo/NCCL's error here is only the symptom
            if world.main and started:
                _mark_failed(Path(out_dir), err)
            from finetune.engine.distributed import lost_ranks

            lost = lost_ranks()
            who = (f"rank {', '.join(map(str, lost))} of this run ended" if lost else
                   "another process of this run ended" + (" (on another node)" if lost == [] else ""))
            print(f"finetune: error: [rank {world.rank}] {who} (its log or the scheduler says why); the last "
                  f"checkpoint stays: resume with: {_resume_command(out_dir)}", file=sys.stderr)
            sys.exit(2)
        if not in_sweep:
            if started:  # a run that started says it failed, and why (a refused one changes nothing)
                _mark_failed(Path(out_dir), err)
            if not isinstance(err, UserError):
                raise  # a bug: the traceback is what a report needs
            _remove_if_nothing_ran(Path(out_dir))
            _report_user_error(cfg, err)
        # one failed job must not end the sweep: record it, say why in one line, let the next job run
        from finetune.commands.hydra_callbacks import mark_failed

        reason = mark_failed(Path(out_dir), err)
        print(f"finetune: job {hydra_cfg.job.num} failed: {reason}", file=sys.stderr)
        return float("nan")  # sweepers (optuna) record a NaN objective as a failed trial
    finally:
        from finetune.engine import distributed

        distributed.close()
        log.setLevel(level)
    log.info("run directory: %s", out_dir)
    # what sweepers optimise: the final value of the task's main metric (val_acc; multilabel: val_map)
    main = f"final_val_{summary['task'].get('main', 'acc')}" if summary.get("task") else "final_val_acc"
    return summary.get(main, summary["final_val_acc"])


class HeldRun:
    """Hydra writes a job's .hydra/ files (and opens its log) before finetune's checks run: into a directory
    that already holds a run (a resume, one about to be refused, a sweep's job run again) it would rewrite
    the run's recorded config with a command line that never trained. So Hydra is told to write no .hydra/
    (`overrides`), the log of a single run goes to a staging file, and `write` puts both in place once the
    run starts. A refused command, or a sweep's completed job kept, changes no byte of the directory."""

    # what hydra.output_subdir would have been ("": none), for the jobs a launcher runs in other processes
    ENV = "FINETUNE_HYDRA_SUBDIR"

    def __init__(self):
        self.staging: Path | None = None
        self.moved = False  # the staged log now lives in the run directory

    def overrides(self, args: list[str], sweep: bool) -> list[str]:
        """The extra overrides for this command line: a sweep's always (each job may hold a run), a single
        run's when its hydra.run.dir holds one."""
        from finetune.engine.checkpoint import holds_run

        run_dir = run_dir_arg(args)
        if not sweep and (run_dir is None or not holds_run(run_dir)):
            return []
        subdir = [a.split("=", 1)[1] for a in args if a.startswith("hydra.output_subdir=")]
        os.environ[self.ENV] = "" if subdir and subdir[-1] == "null" else (subdir[-1] if subdir else ".hydra")
        extra = ["hydra.output_subdir=null"]
        if not sweep and not any(a.startswith("hydra/job_logging=") for a in args):  # Hydra's default: a file
            self.staging = Path(tempfile.mkdtemp(prefix="finetune-log-")) / "finetune.log"
            extra.append(f"hydra.job_logging.handlers.file.filename={hydra_quote(str(self.staging))}")
        return extra

    def write(self, task_cfg: DictConfig, hydra_cfg, run_dir: Path) -> None:
        """The run starts: Hydra's files for this command line in `run_dir`, as Hydra writes them, and a
        single run's log so far appended to the run's own, which the log handler writes to from now on."""
        subdir = os.environ.get(self.ENV)
        if subdir is None:  # Hydra wrote its files itself
            return
        from omegaconf import OmegaConf

        if subdir:
            out = run_dir / subdir
            out.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(task_cfg, out / "config.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), out / "hydra.yaml")
            OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), out / "overrides.yaml")
        if self.staging is not None and not self.moved:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == self.staging:
                    handler.acquire()
                    try:
                        handler.close()
                        with open(run_dir / self.staging.name, "a") as log_file:
                            log_file.write(self.staging.read_text())
                        handler.baseFilename = str((run_dir / self.staging.name).resolve())
                        handler.stream = None  # reopened, for appending, on the next record
                    finally:
                        handler.release()
            self.moved = True

    def clean(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging.parent, ignore_errors=True)
        os.environ.pop(self.ENV, None)
        self.__init__()


HELD_RUN = HeldRun()


def _rerun_job(cfg: DictConfig, job_dir: Path, num: int) -> tuple[DictConfig, float | None]:
    """A sweep run again into its directory, at a job that holds a run: a completed one is kept (its
    objective returned, nothing written), one that stopped is resumed (or started afresh without a
    checkpoint); one still running is left to refuse_used_dir."""
    from omegaconf import OmegaConf

    from finetune.commands import sweep

    action = sweep.rerun_action(job_dir)
    if action == "keep":
        print(f"finetune: job {num} completed before; kept ({job_dir})", file=sys.stderr)
        return cfg, (sweep.read_json(job_dir / "summary.json") or {}).get("final_val_acc")
    if action in ("resume", "fresh"):
        print(f"finetune: job {num} {'resumes' if action == 'resume' else 'starts again'}: its earlier run stopped "
              f"({sweep.job_status(job_dir)})", file=sys.stderr)
        cfg = cfg.copy()
        OmegaConf.update(cfg, "resume" if action == "resume" else "overwrite",
                         str(job_dir) if action == "resume" else True)
    return cfg, None


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another process of the run went away (killed, out of memory)."""
    text = str(err)
    return type(err).__name__ in ("DistBackendError", "DistNetworkError") or any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe"))


def _remove_if_nothing_ran(run_dir: Path) -> None:
    """A command line refused before anything ran leaves no run directory (Hydra made it with its own
    config copy and an empty log), nor the empty date folders of the default outputs/<date>/<time>. A run
    that started holds more: lr_trace.csv is written when training starts."""
    if not run_dir.is_dir() or not set(os.listdir(run_dir)) <= {".hydra", "finetune.log"}:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    here = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == here or here not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def _mark_failed(run_dir: Path, err: Exception) -> None:
    """summary.json says failed (a full disk may refuse even that: then it stays as it was)."""
    from finetune.commands.hydra_callbacks import mark_failed

    try:
        mark_failed(run_dir, err)
    except (OSError, UserError):
        pass


def _submitit_ranks() -> None:
    """A submitit job of several tasks (hydra/launcher=slurm with tasks_per_node) is one distributed run,
    a task per rank: submitit's own helper exports torchrun's variables from SLURM's. CUDA_VISIBLE_DEVICES
    stays as SLURM set it, so LOCAL_RANK picks the GPU."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):  # not installed, or not a submitit job after all
        return


def _join_processes(cfg: DictConfig, out_dir: str) -> str:
    """Under torchrun: join the process group and take rank 0's run directory (each rank's Hydra would
    name its own by the second it started); with one process, `out_dir` as it is."""
    from finetune.engine import distributed
    from finetune.engine.step import resolve_device

    world = distributed.from_env()
    if not world.enabled:
        return out_dir
    distributed.init(world, resolve_device(distributed.device_name(cfg.device, world)))
    return distributed.broadcast(out_dir)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def lr_find_task(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from finetune.commands.compose import recipe_of
    from finetune.commands.train import write_auto_choice
    from finetune.recipes import lr_find

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = _resolve(cfg)  # the range test under the recipe training would train: its LR ratios
        write_auto_choice(recipe_of(cfg), out_dir)
        result = lr_find.run_finder(cfg, out_dir, "lr-find runs in one process (start it without torchrun)")
    except UserError as err:
        _report_user_error(cfg, err)
    print(f"finetune: suggested {result['override']} (valley; steepest descent at {result['steepest']:.3g}); "
          f"plot {out_dir / 'lr_find.png'}\nfinetune: then: finetune train {' '.join(_task_overrides())} "
          f"{result['override']}".rstrip(), file=sys.stderr)
    return result


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+").startswith(("lr", "lr_find."))
            or o.startswith("lr_spread")]


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def inspect_task(cfg: DictConfig) -> dict | None:
    from finetune.commands.inspect import inspect

    try:
        # under experiment=auto the probe runs only with inspect.probe=true (inspect trains nothing): the
        # plan is then auto's near recipe, marked provisional
        return inspect(_resolve(cfg, probe=bool(cfg.inspect.probe)))
    except UserError as err:
        _report_user_error(cfg, err)


# a launcher or sweeper choice -> (the module its Hydra plugin installs, the PyPI package)
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "hydra/launcher=submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def missing_plugin(overrides: list[str]) -> str | None:
    """The one-line error for a launcher or sweeper whose plugin is not installed (else None); Hydra's
    own is a "could not find" that does not say what to install."""
    import importlib.util

    for override in overrides:
        for choice, (module, package) in PLUGINS.items():
            if override.startswith(choice) and importlib.util.find_spec(module) is None:
                return (f"{override} needs the Hydra plugin {package}, which is not installed: "
                        f'pip install "finetune[sweep]" (or pip install {package})')
    return None


def run_dir_arg(args: list[str]) -> Path | None:
    """The run directory the command line names (its last hydra.run.dir=), None when it names none."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    return Path(os.path.expanduser(given[-1].strip("'\""))) if given else None


def unwritable_run_dir(args: list[str]) -> str | None:
    """The one-line error for a run directory that cannot be made (a file, a read-only place), before Hydra
    tries and fails with a traceback; None when it can be."""
    path = run_dir_arg(args) or Path("outputs")
    if path.exists() and not path.is_dir():
        return f"hydra.run.dir={path} is a file, not a folder; choose another run directory"
    parent = next((p for p in [path, *path.absolute().parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        return f"cannot write a run directory in {parent} (no permission); choose another: hydra.run.dir=DIR"
    return None


def threads_per_job(n_jobs: int, cores: int) -> int:
    """Torch threads for each of joblib's parallel jobs so that together they use the cores once
    (n_jobs < 0 counts as joblib does: -1 all cores, -2 all but one)."""
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // min(parallel, cores))


def _share_cores(hydra_cfg) -> None:
    launcher = hydra_cfg.get("launcher") or {}
    if "JoblibLauncher" in str(launcher.get("_target_", "")):
        import torch

        from finetune.data.loaders import available_cores

        torch.set_num_threads(threads_per_job(int(launcher.get("n_jobs", -1)), available_cores()))


def summarize_command(args: list[str]) -> None:
    """`finetune summarize DIR`: rebuild a sweep's summary (also of one partly finished or interrupted)."""
    from finetune.commands import sweep

    if len(args) != 1 or args[0].startswith("-"):
        print("usage: finetune summarize SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(args[0])
    if not sweep_dir.is_dir():
        print(f"finetune: error: summarize: no such directory: {sweep_dir}", file=sys.stderr)
        sys.exit(2)
    rows = sweep.summarize(sweep_dir)
    if not rows:
        print(f"finetune: error: summarize: {sweep_dir} holds no job directories", file=sys.stderr)
        sys.exit(2)
    print(f"finetune: {sweep.failure_line(rows)}; summary in {sweep_dir}/summary.md", file=sys.stderr)
    sys.exit(1 if sweep.failed(rows) else 0)


def _exit_for_sweep(report: Path) -> None:
    """After a multirun: the last line says how many jobs failed; any failure makes the exit code 1.
    `report`: the file the sweep's summary callback wrote its counts to (absent: no job ran)."""
    if not report.is_file() or not report.read_text():
        return
    result = json.loads(report.read_text())
    failed, total, sweep_dir = result["failed"], result["total"], result["sweep_dir"]
    if failed:
        print(f"finetune: {failed} of {total} jobs failed; summary in {sweep_dir}/summary.md", file=sys.stderr)
        sys.exit(1)
    print(f"finetune: all {total} jobs completed; summary in {sweep_dir}/summary.md", file=sys.stderr)


# the command table, in one place: Hydra's apps, the key=value commands (their module under finetune.commands)
# and the two with arguments of their own; USAGE describes them, in this order
COMMANDS = {"train": train_task, "inspect": inspect_task, "lr-find": lr_find_task}  # Hydra's
MODEL_COMMANDS = {"eval": "evaluate", "predict": "predict", "export": "export", "shard": "shard"}
OWN_COMMANDS = {"summarize": lambda args: summarize_command(args), "config": lambda args: config_command(args)}
ALL_COMMANDS = [*COMMANDS, *MODEL_COMMANDS, *OWN_COMMANDS]


def _shell_completion(argv: list[str]) -> None:
    """Hydra's tab completion (`finetune -sc install=bash`); queries see the line without the command."""
    line = os.environ.get("COMP_LINE")
    if line is not None:
        words = line.split()
        if len(words) == 1 or (len(words) == 2 and not line.endswith(" ")):
            print(" ".join(ALL_COMMANDS))  # completing the command itself
            return
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:]) + (" " if line.endswith(" ") else "")
    register_configs()
    sys.argv = ["finetune"] + argv
    train_task()


def model_command(command: str, args: list[str]) -> None:
    """eval / predict / export / shard: key=value arguments (not Hydra: they start from a checkpoint's config, or
    need none)."""
    import importlib

    module = importlib.import_module(f"finetune.commands.{MODEL_COMMANDS[command]}")
    if args and args[0] in ("-h", "--help"):
        print(model_command_help(command, module))
        sys.exit(0)
    # finetune's log on stderr while the command runs (not the root logger's: a caller's logging stays as it was)
    handler, level = logging.StreamHandler(sys.stderr), log.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        module.run(args)
    except UserError as err:
        print(f"finetune: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    sys.exit(0)


def command_help(command: str, every_key: bool = False) -> str:
    """`finetune <train|inspect|lr-find> --help`: the config groups and their choices, the keys with
    their defaults and one line each (from the schema's own comments), and the recipe the default applies."""
    from finetune.config import overrides, reference

    keys = reference.keys()
    shown = keys if every_key else [k for k in keys if k.name in COMMON_KEYS]
    width = max(len(k.name) for k in shown)
    lines = [f"usage: finetune {command} [key=value ...] [group=choice ...]" + (" [-m]" if command == "train" else ""),
             "", "The default recipe, experiment=auto, probes the train images and then trains lp_ft or freezeout",
             "(experiment=<recipe> names one). `finetune config [overrides]` prints the config a command line",
             "trains, recipe applied.", "", "config groups (group=choice):"]
    for group in reference.GROUPS:
        options = overrides.group_options(group) or []
        lines.append(f"  {group:<15}{' | '.join(options)}")
    lines += ["", "every key (key=value):" if every_key else "common keys (key=value; every key: --help-all):"]
    for k in shown:  # the value the default trains: lp_ft's where it sets one (auto's choice for most data)
        value = f"{reference.as_text(k.recipes['lp_ft'])}*" if "lp_ft" in k.recipes else k.default
        lines.append(f"  {k.name:<{width}}  {value:<12} {k.description}")
    lines += ["", "* set by lp_ft, the recipe auto trains where the pretrained features fit the data (most data;",
              "  freezeout's values where an earlier layer's fit clearly better: finetune config experiment=freezeout)",
              "", "Hydra's own options (sweeps, --cfg, completion): --hydra-help"]
    return "\n".join(lines)


def model_command_help(command: str, module) -> str:
    """eval / predict / export --help: the module's text and every key it takes with its default."""
    import dataclasses

    from finetune.config import reference

    schema = next(v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__name__.endswith("Args"))
    notes = reference.descriptions(schema)
    fields = dataclasses.fields(schema)
    width = max(len(f.name) for f in fields)
    lines = [(module.__doc__ or "").strip(), "", "keys (key=value):"]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        default = "(required)" if str(default) == "???" else default
        lines.append(f"  {f.name:<{width}}  {str(default):<10} {notes.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def config_command(args: list[str]) -> None:
    """`finetune config [overrides]`: the config `finetune train <overrides>` trains, recipe applied; under
    experiment=auto the recipe the probe would choose is not known yet: auto.near's, marked provisional."""
    from omegaconf import OmegaConf

    from finetune.commands.compose import compose, recipe_of
    from finetune.config.recipe import line

    if args and args[0] in ("-h", "--help", "--help-all"):
        print(command_help("config", every_key=args[0] == "--help-all"))
        sys.exit(0)
    try:
        cfg = compose(args, probe=False)
    except UserError as err:
        print(f"finetune: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    recipe = recipe_of(cfg)
    choice = (recipe or {}).get("auto")
    if choice:
        print(f"# experiment=auto: provisionally {choice['recipe']} (auto.near); the probe of the train images "
              f"chooses {cfg.auto.near} or {cfg.auto.far} when training starts")
    print(f"# {line({k: v for k, v in recipe.items() if k != 'auto'} if recipe else None)}")
    shown = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    shown.pop("recipe", None)
    print(OmegaConf.to_yaml(shown), end="")
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in ("-sc", "--shell-completion"):
        _shell_completion(argv)
        return
    if command in OWN_COMMANDS:
        OWN_COMMANDS[command](rest)
    if command in MODEL_COMMANDS:
        model_command(command, rest)
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, ALL_COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"finetune: error: unknown command '{command}'{hint}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if rest and rest[0] in ("-h", "--help", "--help-all"):
        print(command_help(command, every_key=rest[0] == "--help-all"))
        return
    from finetune.config import overrides
    from finetune.engine import distributed

    problem = missing_plugin(rest) or (unwritable_run_dir(rest) if command == "train" else None)
    try:
        overrides.check(rest)
        world = distributed.from_env()
    except UserError as err:
        problem = problem or str(err)
        world = distributed.SINGLE
    if not problem and world.enabled and any(a in ("-m", "--multirun") for a in rest):
        problem = ("a sweep (-m) under torchrun would start every job in every process; sweep with a launcher "
                   "whose jobs each run torchrun, or give each job several tasks (docs/guide/multi-gpu.md)")
    if problem:
        if world.main:  # the same line from every process would say nothing more
            print(f"finetune: error: {problem}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    if command == "inspect":
        rest = INSPECT_OVERRIDES + rest
    elif world.enabled and not world.main:  # rank 0 alone writes the run directory, Hydra's files included
        rest = [a for a in rest if not a.startswith("hydra.run.dir=")] + INSPECT_OVERRIDES
    sweeping = any(a in ("-m", "--multirun") for a in rest)
    if command == "train" and world.main:
        rest = rest + HELD_RUN.overrides(rest, sweeping)
    try:
        if not sweeping:
            sys.argv = [f"finetune {command}"] + rest
            COMMANDS[command]()
            return
        # a sweep: its summary callback writes the counts the exit code comes from to this file
        with tempfile.TemporaryDirectory() as scratch:
            report = Path(scratch) / "sweep.json"
            sys.argv = [f"finetune {command}"] + rest + [f"++hydra.callbacks.sweep_summary.report={report}"]
            COMMANDS[command]()
            _exit_for_sweep(report)
    finally:
        HELD_RUN.clean()


if __name__ == "__main__":
    main()
