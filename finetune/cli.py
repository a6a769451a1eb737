"""Command line: `finetune train <hydra overrides>` and `finetune inspect <hydra overrides>`.

After the subcommand everything is Hydra (overrides, --cfg job, --help, -m multirun, completion).
User errors print one line and exit with code 2 (set verbose=true for the traceback too). SIGINT/SIGTERM
stop training after the current step with a checkpoint and the command that resumes, exit 128 + signal.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.config import register_configs
from finetune.errors import UserError

USAGE = """usage: finetune <command> [hydra overrides...]

Fine-tune pretrained vision models: layer groups, freezing, per-group LR schedules.

commands:
  train     fine-tune as configured (e.g. finetune train model=resnet18 unfreeze=5)
  inspect   print the layer groups, what trains when and every group's LR plan; trains nothing
            (inspect.format=json for JSON)

After the command, everything is Hydra: `finetune train --help` lists the config groups,
`finetune train --cfg job` prints the composed config, `finetune train -m unfreeze=1,3,all` sweeps.
Tab completion: eval "$(finetune -sc install=bash)"
"""

# conf/ sits next to the package in a checkout; a wheel ships it as the package finetune.conf
_SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if (_SOURCE_CONF / "train.yaml").is_file() else "pkg://finetune.conf"
INSPECT_OVERRIDES = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                     "hydra/hydra_logging=none"]

log = logging.getLogger("finetune")


def _report_user_error(cfg: DictConfig, err: Exception) -> None:
    """One line on stderr and exit 2; verbose=true prints the traceback above that line."""
    if cfg.get("verbose"):
        traceback.print_exception(err)
    message = " ".join(str(err).split("\n"))  # one line, even for a message that slipped a newline in
    print(f"finetune: error: {message}", file=sys.stderr)
    sys.exit(2)


def _resume_command(out_dir: str) -> str:
    """The command line that continues this run: its overrides, with resume= pointing at its directory."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "+resume="))]
    return shlex.join(["finetune", "train", *overrides, f"resume={out_dir}"])


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def train_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from finetune.train import Interrupted, train

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train(cfg, out_dir)
    except UserError as err:
        _report_user_error(cfg, err)
    except Interrupted as stop:
        print(f"finetune: {stop.reason}\nfinetune: resume with: {_resume_command(out_dir)}", file=sys.stderr)
        sys.exit(128 + (stop.signum or 2))  # the shell convention for "killed by this signal"
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while stopping
        print("finetune: interrupted; stopped at once (a checkpoint written before is kept)", file=sys.stderr)
        sys.exit(130)
    log.info("run directory: %s", out_dir)
    return summary["final_val_acc"]  # what sweepers optimise


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def inspect_task(cfg: DictConfig) -> dict | None:
    from finetune.inspect_run import inspect

    try:
        return inspect(cfg)
    except UserError as err:
        _report_user_error(cfg, err)


COMMANDS = {"train": train_task, "inspect": inspect_task}


def _shell_completion(argv: list[str]) -> None:
    """Hydra's tab completion (`finetune -sc install=bash`); queries see the line without the command."""
    line = os.environ.get("COMP_LINE")
    if line is not None:
        words = line.split()
        if len(words) == 1 or (len(words) == 2 and not line.endswith(" ")):
            print(" ".join(COMMANDS))  # completing the command itself
            return
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:]) + (" " if line.endswith(" ") else "")
    register_configs()
    sys.argv = ["finetune"] + argv
    train_task()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in ("-sc", "--shell-completion"):
        _shell_completion(argv)
        return
    if command not in COMMANDS:
        print(f"finetune: error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    if command == "inspect":
        rest = INSPECT_OVERRIDES + rest
    sys.argv = [f"finetune {command}"] + rest
    COMMANDS[command]()


if __name__ == "__main__":
    main()
