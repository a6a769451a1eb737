"""Checkpoints: atomic writes, safe loads (weights_only), RNG capture for exact resume.

A checkpoint is a dict saved with torch.save; the model's state dict is under the key "model".
Other keys: optimizer, scaler, epoch (epoch in progress), batch (batches done in it), step (global),
best_val_acc, rng, config (resolved), groups ([name, [param names]]), trace, metrics.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from finetune.errors import UserError

FORMAT = "finetune-checkpoint/1"
LAST = "last.pt"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target: a crash
    (even SIGKILL) mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | os.PathLike, what: str = "checkpoint"):
    """torch.load with weights_only=True: a pickle that would run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise UserError(
                f"{what} {path} contains pickled code or objects that are not plain tensors; refusing to "
                "load it (weights_only=True). Re-save it as a plain state dict or .safetensors"
            ) from None
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file ({first})") from None


def resolve_resume_path(resume: str) -> Path:
    """A checkpoint file, or a run directory holding checkpoints/last.pt."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise UserError(f"resume: no checkpoint at {path}")
    return path


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
