"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import contextlib
import os


class UserError(ValueError):
    """A problem with the user's input (config, data, weights) or machine (a full disk), not a bug in finetune."""


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """An OSError (disk full, no permission, a vanished directory) while writing `path` becomes one line
    naming the file and the reason."""
    try:
        yield
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}") from err
