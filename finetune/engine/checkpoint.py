"""Checkpoints: what a run saves, RNG capture and the checks for an exact resume (the file itself is
written atomically and read safely by finetune.base.files).

A checkpoint is a dict saved with torch.save; the model's state dict is under the key "model".
Other keys: optimizer, scaler, epoch (epoch in progress), batch (batches done in it), step (global),
steps_per_epoch, best_val_acc, rng, config (resolved), groups ([name, [param names]]), trace_file (the
run's lr_trace.csv, which a resume continues), metrics and
the running sums of the epoch in progress; world_size, and under torchrun `ranks`: every rank's RNG
state and epoch sums, so each rank resumes its own stream.
classes (the class names, in label order) and preprocess (mean, std, input_size, interpolation,
crop_pct as trained) let eval, predict and export use the model without the training data; recipe (what
the run's recipe set, and experiment=auto's choice, which a resume keeps). Everything is plain tensors,
numbers, strings and containers, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from finetune.base.errors import UserError
from finetune.base.files import safe_load
from finetune.config.recipe import flatten

FORMAT = "finetune-checkpoint/1"
LAST = "last.pt"
# config keys that do not change what a run computes: a resume may change them silently
NEUTRAL_KEYS = ("resume", "verbose", "progress", "overwrite", "time_limit", "logger", "recipe")


def resolve_resume_path(resume: str, what: str = "resume") -> Path:
    """A checkpoint file, a run directory holding checkpoints/last.pt, or that checkpoints/ folder itself.
    `what` names the setting in errors (resume, ckpt)."""
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / LAST if (path / LAST).is_file() and path.name == "checkpoints" else path / "checkpoints" / LAST
    if not path.is_file():
        raise UserError(f"{what}: no checkpoint at {path} (give a run directory or a checkpoint file)")
    return path


def load_checkpoint(resume: str, what: str = "resume") -> tuple[Path, dict]:
    """The checkpoint `resume` points at (run dir or file), loaded safely and checked to be finetune's."""
    path = resolve_resume_path(resume, what)
    saved = safe_load(path, f"{what}: checkpoint")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(f"{what}: {path} is not a finetune checkpoint (a weights file goes in model.weights)")
    return path, saved


def resumed(resume: str | None) -> dict | None:
    """The checkpoint a run's `resume` setting names, loaded; None for a fresh run."""
    return load_checkpoint(resume)[1] if resume else None


def config_changes(old: Mapping, new: Mapping, neutral: Sequence[str] = NEUTRAL_KEYS) -> list[str]:
    """Dotted keys whose value differs between two resolved configs (added or removed ones too)."""
    a, b = flatten(dict(old)), flatten(dict(new))
    changed = {k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")
               and k.split(".")[0] not in neutral}
    # an empty section that gained keys (per_group: {} -> per_group.head.lr) is named by the keys alone
    return sorted(k for k in changed if not any(other.startswith(f"{k}.") for other in changed))


def check_resumable(saved: Mapping, config: Mapping, groups: Sequence[tuple[str, Sequence[str]]],
                    model_state: Mapping[str, torch.Tensor], steps_per_epoch: int) -> None:
    """Refuse a resume that would not continue the checkpoint's run: another model or optimizer, other
    layer groups, other parameter shapes (e.g. data.num_classes) or another number of steps per epoch."""
    old_model, new_model = saved["config"].get("model", {}), config.get("model", {})
    for key in ("name", "source", "_target_"):
        if old_model.get(key) != new_model.get(key):
            raise UserError(
                f"resume: the checkpoint was trained with model.{key}={old_model.get(key)}, not "
                f"{new_model.get(key)}; resuming a different model is refused"
            )
    old_opt, new_opt = saved["config"].get("optimizer", {}), config.get("optimizer", {})
    for key in ("name", "no_decay_norm_bias"):  # the saved optimizer state only fits the same layout
        if old_opt.get(key) != new_opt.get(key):
            raise UserError(
                f"resume: the checkpoint's optimizer state is for optimizer.{key}={old_opt.get(key)}, not "
                f"{new_opt.get(key)}; resuming with another optimizer is refused"
            )
    old_groups = [(name, list(members)) for name, members in saved["groups"]]
    new_groups = [(name, list(members)) for name, members in groups]
    if old_groups != new_groups:
        old_names, new_names = [n for n, _ in old_groups], [n for n, _ in new_groups]
        what = (f"checkpoint {old_names}, now {new_names}" if old_names != new_names
                else f"same names {new_names} but different parameters in them")
        raise UserError(f"resume: the layer groups changed ({what}); resuming with other groups is refused")
    shapes = {k: tuple(v.shape) for k, v in saved["model"].items()}
    now = {k: tuple(v.shape) for k, v in model_state.items()}
    if shapes != now:
        diff = sorted(k for k in shapes.keys() | now.keys() if shapes.get(k) != now.get(k))
        detail = ", ".join(f"{k}: checkpoint {shapes.get(k)} vs now {now.get(k)}" for k in diff[:3])
        adapters = [k for k in diff if ".default." in k or "base_layer" in k]  # peft's names
        why = ("did the adapters' settings change (peft.kind, peft.r, peft.target, peft.groups)?" if adapters else
               "did data or the number of classes change?")
        raise UserError(f"resume: the model's parameters do not fit the checkpoint ({detail}); {why}")
    old_steps = saved.get("steps_per_epoch")
    if old_steps is not None and old_steps != steps_per_epoch:
        raise UserError(
            f"resume: the checkpoint's run has {old_steps} steps per epoch, this config {steps_per_epoch} "
            "(batch_size or the data changed); the schedule position cannot be carried over"
        )


def rng_state() -> dict:
    """Every RNG the run touches, in types weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what a run, and eval / export / lr-find of it, write in its directory: overwrite=true clears them, so no
# file of the run it replaces is left beside the new one (Hydra's .hydra/ and finetune.log are this job's)
RUN_FILES = ("checkpoints", "tensorboard", "export", "eval", "metrics.csv", "evals.csv", "lr_trace.csv",
             "lr_trace.png", "summary.json", "diagnostics.csv", "diagnostics.png", "activations.csv",
             "activations.png", "auto.json", "lr_find.csv", "lr_find.png", "error.log", "trackers.json", "wandb",
             "per_class.csv", "confusion_matrix.png")


def clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunDirInUse(UserError):
    """The run directory holds another run: nothing of this one may be written there."""


def holds_run(run_dir: Path) -> Path | None:
    """The file that shows `run_dir` holds a run (its checkpoint or summary), or None."""
    return next((p for p in (run_dir / "checkpoints" / LAST, run_dir / "summary.json") if p.is_file()), None)


def refuse_used_dir(out_dir: Path, cfg) -> None:
    """A run directory holds one run: a second one there would replace its checkpoint and mix the logs."""
    held = holds_run(out_dir)
    if held is None or cfg.overwrite:
        return
    if cfg.resume and resolve_resume_path(cfg.resume).resolve().parent.parent == out_dir.resolve():
        return  # continuing the run that is there
    raise RunDirInUse(f"{out_dir} already holds a run ({held.name}); continue it with resume={out_dir}, "
                      "choose another directory (hydra.run.dir=...) or replace it with overwrite=true")
