"""`train(cfg, out_dir)`: fine-tune as configured. The run and its loop live in finetune/engine/loop.py (what
attaches to the loop in finetune/engine/listeners.py), one training step in finetune/engine/step.py; their public
names are importable from here as well, where scripts and tests have always found them."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.base.errors import UserError
from finetune.config.recipe import line
from finetune.engine.divergence import NonFiniteLoss  # noqa: F401
from finetune.engine.loop import Run, RunState, build_run  # noqa: F401
from finetune.engine.signals import Interrupted  # noqa: F401
from finetune.engine.step import (  # noqa: F401
    Trainer,
    resolve_device,
    resolve_precision,
    seed_everything,
    trace_rows,
)


def train(cfg, out_dir: str | Path, *, stop_at_step: int | None = None, recipe: dict | None = None,
          compose=None) -> dict:
    """Fine-tune as configured, writing the run directory; returns the summary (with final_val_acc).

    `cfg.resume` (a run directory or checkpoint file) continues that run exactly: same weights, optimizer
    state, schedule position, freeze state, RNG and data order; the checkpoint carries the metrics and
    names its lr_trace.csv, so `out_dir` (which may be a new directory) gets complete reports.
    SIGINT/SIGTERM stop the run after the current step: checkpoint, reports, then `Interrupted`.
    `stop_at_step` (library only) stops the same way once that many steps are done (at an epoch's end:
    after its evaluation): it splits one plan over several runs (time-limited jobs; tests of exact
    resume), where a run with fewer `epochs` would follow a different schedule.
    `recipe` (what the recipe set, finetune.config.recipe.describe) is saved in summary.json.
    `lr=auto` runs the LR finder first (lr_find.png in `out_dir`) and trains with its suggestion, which
    summary.json keeps under lr_auto.
    `experiment=auto` (cfg.auto.enabled) probes the data first and trains the recipe it chooses
    (finetune/recipes/auto.py): `compose(recipe)` gives (the config under experiment=<recipe> with the same
    overrides, what that recipe set); the CLI passes it. summary.json keeps the choice under recipe.auto.
    """
    from finetune.engine import checkpoint

    # read once: auto's choice, lr=auto's LR and the run's state all come from it
    saved = checkpoint.resumed(cfg.resume)
    if cfg.auto.enabled:
        if compose is None:
            raise UserError("experiment=auto composes the recipe it chooses: run it with `finetune train`, or "
                            "pass train(..., compose=...)")
        from finetune.recipes import auto

        cfg, recipe = auto.resolve(cfg, out_dir, compose, saved)
        logging.getLogger("finetune").info("%s", line(recipe))
    lr_auto = None
    if str(cfg.lr) == "auto":
        cfg, lr_auto = _auto_lr(cfg, Path(out_dir), saved)
    return Run(cfg, out_dir, stop_at_step=stop_at_step, recipe=recipe, lr_auto=lr_auto, saved=saved).fit()


def _auto_lr(cfg, out_dir: Path, saved: dict | None):
    """lr=auto: the LR finder's suggestion (finetune/recipes/lr_find.py) becomes lr; a resumed run keeps the LR
    its checkpoint (`saved`) was trained with."""
    import copy

    from omegaconf import OmegaConf

    from finetune.recipes import lr_find

    if saved is not None:
        chosen = {"lr": saved["config"]["lr"], "resumed": True}
    else:
        chosen = lr_find.choose(cfg, out_dir)
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "lr", chosen["lr"])
    return cfg, chosen
