"""lr_trace.csv (and the diagnostics' CSVs) written as training goes: a row per group per step, appended and flushed with every
checkpoint, so neither memory nor checkpoints grow with the number of steps (150k steps x 15 groups are
2.25M rows). A resumed run starts from the rows of the steps its checkpoint holds, copied from the old
run's file (or the file itself, cut back, when it resumes in place)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from finetune.base.errors import writing

FIELDS = ("step", "epoch", "group", "lr", "momentum", "trainable")
log = logging.getLogger("finetune")


def _rows_before(path: Path, step: int) -> Iterable[str]:
    """The data lines of a trace file whose step is below `step`, as written (text, not re-formatted)."""
    with open(path, newline="") as f:
        next(f, None)  # header
        for line in f:
            head = line.split(",", 1)[0]
            if head.isdigit() and int(head) < step:
                yield line


class TraceFile:
    """The run's lr_trace.csv, open for appending. `start(step, previous, saved_rows)`: rows of earlier
    steps from `previous` (the resumed run's file) or, for checkpoints of before streaming, `saved_rows`."""

    def __init__(self, path: Path, fields: Sequence[str] = FIELDS):
        self.path, self.fields = path, tuple(fields)
        self._file = None
        self._writer = None

    def start(self, step: int = 0, previous: Path | None = None, saved_rows: Sequence[dict] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with writing(self.path):
            with open(tmp, "w", newline="") as out:
                out.write(",".join(self.fields) + "\r\n")
                if step and previous is not None and previous.is_file():
                    out.writelines(_rows_before(previous, step))
                elif step and saved_rows:
                    csv.DictWriter(out, fieldnames=FIELDS).writerows(r for r in saved_rows if r["step"] < step)
                elif step:
                    log.warning("resume: no lr_trace.csv of the first %d steps at %s; the trace starts at step %d",
                                step, previous, step)
            os.replace(tmp, self.path)  # also over the old file when resuming in place: cut back to `step`
            self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields)

    def write(self, rows: Sequence[dict]) -> None:
        with writing(self.path):
            self._writer.writerows(rows)

    def flush(self) -> None:
        if self._file is not None:
            with writing(self.path):
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read(path: Path, every: int = 1) -> list[dict]:
    """The trace's rows (typed) of every `every`-th step: what the plot needs, without millions of points."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            step = int(r["step"])
            if step % every == 0:
                rows.append({"step": step, "epoch": int(r["epoch"]), "group": r["group"], "lr": float(r["lr"]),
                             "momentum": float(r["momentum"]) if r["momentum"] else None,
                             "trainable": int(r["trainable"])})
    return rows


def read_rows(path: Path) -> list[dict]:
    """Any of the streamed CSVs (diagnostics.csv, activations.csv) as dicts, numbers as numbers."""
    def number(text: str):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    with open(path, newline="") as f:
        return [{k: number(v) for k, v in r.items()} for r in csv.DictReader(f)]


class NoTrace(TraceFile):
    """What a rank other than 0 holds: rank 0 alone writes the run directory."""

    def start(self, step: int = 0, previous: Path | None = None, saved_rows: Sequence[dict] | None = None) -> None:
        pass

    def write(self, rows: Sequence[dict]) -> None:
        pass
