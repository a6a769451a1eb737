"""Shared by the reliability tests (resume, interrupt, bad input): a tiny run's config, composed by Hydra
from conf/ exactly as the CLI composes it, the in-process CLI, and one torch thread."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from finetune.commands import cli
from finetune.config.schema import register_configs

ROOT = Path(__file__).resolve().parent.parent
# resnet18 at 16 px, random init, 2 synthetic classes, 3 steps of 8 images an epoch
TINY = ["model=resnet18", "model.weights=null", "data=synthetic", "data.image_size=16", "data.num_classes=2",
        "data.train_size=24", "data.val_size=8", "batch_size=8", "progress=false", "device=cpu"]
# Hydra without logging set-up or a .hydra/ folder, for in-process CLI calls
QUIET = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
# subprocesses: one OpenMP thread each (see one_thread)
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


# library runs name a fixed recipe: the default, experiment=auto, composes its choice through the CLI
# (tests/test_auto.py); lp_ft is what it chooses for pretrained features that fit
LIBRARY_RECIPE = "experiment=lp_ft"


def compose_cfg(*overrides: str):
    """The CLI's config for TINY + overrides (no hydra node: `train` does not need it), under
    LIBRARY_RECIPE unless the overrides name one."""
    register_configs()
    named = any(o.lstrip("+~").split("=")[0] == "experiment" for o in overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, *([] if named else [LIBRARY_RECIPE]), *overrides])


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """`finetune <args>` in-process: (exit code, stderr lines)."""
    capsys.readouterr()
    argv = sys.argv
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err.strip().splitlines()
