"""Torch files written atomically and read safely: a crash mid-write leaves the previous file intact,
and a pickle that would run code is refused, never executed (torch.load with weights_only=True)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch

from finetune.base.errors import UserError, writing


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target: a crash
    (even SIGKILL) mid-write leaves the previous checkpoint intact. A writer killed mid-write leaves its
    `.<name>.*.tmp` file behind; loaders only ever open the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name per write ("x": never reuse one); open() keeps the umask's permissions, mkstemp's are 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with writing(path), open(tmp, "xb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:  # torch's zip writer reports a short write (a full disk) as this
                free = shutil.disk_usage(path.parent).free
                raise OSError(errno.ENOSPC if free < 1 << 20 else errno.EIO,
                              f"{os.strerror(errno.ENOSPC) if free < 1 << 20 else 'write failed'} "
                              f"({free // 1024} KiB free; torch: {str(err).splitlines()[0][:120]})") from None
            f.flush()
            os.fsync(f.fileno())
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable (power loss), not only the data


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def safe_load(path: str | os.PathLike, what: str = "checkpoint"):
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed.
    `what` starts every error message (e.g. "model.weights:" or "resume: checkpoint")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a pickle that asks for a global (code) is refused as such: named by torch's safe loader, or
        # found with pickletools where that loader stops earlier (protocol-4 framing); anything else is
        # damage. torch's advice to retry with weights_only=False is never passed on
        # torch names it "Unsupported global: GLOBAL x", or for a blocked module "unsupported GLOBAL x whose ..."
        unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
        needs = unsafe.group(1) if unsafe else _pickled_code(path)
        if needs:
            raise UserError(
                f"{what} {path} is a pickle that would run code ({needs}); finetune refuses to load it and "
                "never runs it: re-save the weights as a plain state dict or a .safetensors file"
            ) from None
        # torch's first line advises weights_only=False, which would run whatever the file holds: not shown
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s{2,}|$)", str(e))
        reason = detail.group(1) if detail else "the safe loader could not read it"
        raise UserError(f"{what} {path} is corrupt or not a torch file ({reason})") from None
    except Exception as e:  # a damaged file surfaces as almost any type (KeyError, RuntimeError, EOFError...)
        raise UserError(f"{what} {path} is corrupt or not a torch file ({first_line(e)})") from None


def _pickled_code(path: Path) -> str | None:
    """The first global a plain pickle file would import (and so could call), read with pickletools, which
    parses opcodes without running any; None for a file that is no pickle (garbage, a damaged archive).
    torch's safe loader stops at the framing of a protocol-4 pickle before it reaches the global."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle: pickletools raises on the first byte that is no opcode
        return None
    return None


def cache_home(*parts: str) -> Path:
    """finetune's cache folder, $XDG_CACHE_HOME/finetune (~/.cache when unset), joined with `parts`: the
    stored probes, resized copies and downloaded shards live under it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "finetune" / Path(*parts)
