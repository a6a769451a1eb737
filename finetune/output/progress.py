"""Rich progress bar per epoch (loss, accuracy, images/s, LR per group) and the final summary table."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

log = logging.getLogger("finetune")
# without a terminal (piped into tee, a CI log, a cluster job's file) a bar cannot redraw: a plain line
# says where the work is this often instead
PLAIN_EVERY = 30.0


class CompactFormatter(logging.Formatter):
    """Log lines on a terminal as `12:04:31 message` (`12:04:31 warning: message` from WARNING up); piped
    output keeps the date, logger and level (a CI log is read later, beside other programs' lines)."""

    FULL = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        super().__init__("%(asctime)s %(message)s" if self.terminal else self.FULL,
                         datefmt="%H:%M:%S" if self.terminal else None)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if self.terminal and record.levelno >= logging.WARNING:
            time_, _, message = text.partition(" ")
            return f"{time_} {record.levelname.lower()}: {message}"
        return text


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines, at most one every PLAIN_EVERY seconds (and at the first step), for output
    that is not a terminal: `caching features: 120/400 (30%), 0:00:31 elapsed, 0:01:12 left`."""

    def __init__(self, console: Console, every: float = PLAIN_EVERY):
        self.console, self.every = console, every
        self.t0 = self.last = 0.0
        self.what, self.total, self.start_done = "", 0, 0

    def start(self, what: str, total: int, done: int = 0) -> None:
        self.what, self.total, self.start_done = what, total, done
        self.t0 = time.monotonic()
        self.last = self.t0 - self.every  # the first step prints

    def show(self, done: int, info: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 and done > self.start_done else 0.0
        left = f", {_clock((self.total - done) / rate)} left" if rate else ""
        share = f" ({100 * done // self.total}%)" if self.total else ""
        self.console.print(f"{self.what}: {done}/{self.total}{share}, {_clock(elapsed)} elapsed{left}"
                           + (f" | {info}" if info else ""), markup=False, highlight=False, soft_wrap=True)


def lr_text(trace: Sequence[dict]) -> str:
    """The LRs of the groups that train, the head (the last group) first, then down the network."""
    training = [r for r in reversed(trace) if r["trainable"]]
    return " ".join(f"{r['group']}={r['lr']:.1e}" for r in training) or "none trains"


class _ToConsole:
    """A stream for logging handlers while the bar is shown: each record printed above the bar."""

    def __init__(self, console: Console):
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


class EpochProgress:
    """One bar per epoch: `epoch E of 0..N-1` (epochs count from 0 everywhere: logs, metrics.csv, configs),
    the bar, steps done of the epoch's, elapsed and remaining time, then the loss, the LRs of the groups that
    train (head first), accuracy and images/s; that last column is cut to the width, never the bar, the
    step count or the time. Log lines go above the bar while it is shown."""

    def __init__(self, enabled: bool, group_names: Sequence[str], console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.group_names = list(group_names)
        self.progress: Progress | None = None
        self.task = None
        self._streams: list[tuple[logging.StreamHandler, object]] = []
        # no terminal: a plain line every PLAIN_EVERY seconds (a live bar would appear all at once at the end)
        self.plain = PlainProgress(self.console) if enabled and not self.console.is_terminal else None
        self.info = ""

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if not self.enabled:
            return
        if self.plain is not None:
            self.plain.start(f"epoch {epoch} of 0..{epochs - 1}", steps, done)
            self.info = ""
            return
        if self.progress is None:
            fixed = Column(no_wrap=True)
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}", table_column=fixed),
                BarColumn(bar_width=32 if self.console.width >= 120 else 8, table_column=Column(no_wrap=True)),
                MofNCompleteColumn(table_column=Column(no_wrap=True)),
                TimeElapsedColumn(table_column=Column(no_wrap=True)),
                TimeRemainingColumn(table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=self.console, transient=False, expand=True,
            )
            self._log_above()  # before start: the live display then swaps sys.stderr for its own proxy
            self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done,
                                           epoch=f"{epoch} of 0..{epochs - 1}", info="")

    def _log_above(self) -> None:
        """Handlers writing to the terminal print through the bar's console while it is shown (the bar
        redraws below them), instead of writing into the bar's line."""
        terminal = {id(sys.stderr), id(sys.stdout), id(sys.__stderr__), id(sys.__stdout__)}
        for logger in (logging.getLogger(), log):
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and id(handler.stream) in terminal:
                    self._streams.append((handler, handler.setStream(_ToConsole(self.console))))

    def step(self, done: int) -> None:
        """The bar's step count, every step (no device sync: the numbers come with `update`)."""
        if self.plain is not None:
            self.plain.show(done, self.info)
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def update(self, done: int, loss: float, acc: float, images_per_s: float, trace: Sequence[dict]) -> None:
        info = f"loss {loss:.3f} | lr {lr_text(trace)} | acc {acc:.3f} {images_per_s:.0f} img/s"
        if self.plain is not None:
            self.info = info
            self.plain.show(done, info)
        if self.progress is None:
            return
        self.progress.update(self.task, completed=done, info=info)

    def end_epoch(self, metrics: dict) -> None:
        train = [k for k in metrics if k.startswith("train_")]
        val = [k for k in metrics if k.startswith("val_")]
        line = (" ".join(f"{k[len('train_'):]} {metrics[k]:.3f}" for k in train) + " | "
                + " ".join(f"{k.replace('_', ' ')} {metrics[k]:.3f}" for k in val)
                + f" | {metrics['images_per_s']:.0f} img/s")
        log.info("epoch %d: %s", metrics["epoch"], line)  # also in the run's log file
        if self.progress is not None:
            self.progress.update(self.task, info=line)

    def stop(self) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        self._streams.clear()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, metrics: Sequence[dict], summary: dict) -> None:
        if not self.enabled:
            return
        table = Table(title="finetune: run summary")
        for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "img/s", "s"):
            table.add_column(col, justify="right")
        for m in metrics:
            table.add_row(str(m["epoch"]), f"{m['train_loss']:.4f}", f"{m['train_acc']:.4f}",
                          f"{m['val_loss']:.4f}", f"{m['val_acc']:.4f}", f"{m['images_per_s']:.1f}",
                          f"{m['seconds']:.1f}")
        self.console.print(table)
        self.console.print(f"best val acc {summary['best_val_acc']:.4f}, final {summary['final_val_acc']:.4f}, "
                           f"{summary['wall_seconds']:.1f} s")


@contextlib.contextmanager
def bar(total: int, what: str, enabled: bool = True):
    """A one-line progress bar over `total` batches of long work (eval, predict, lr-find); yields the
    function that advances it by one."""
    if not enabled:
        yield lambda: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:  # piped: a plain line now and then, not a bar drawn all at once at the end
        plain, done = PlainProgress(console), [0]
        plain.start(what, total)

        def advance():
            done[0] += 1
            plain.show(done[0])

        yield advance
        return
    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    task = progress.add_task(what, total=total)
    with progress:
        yield lambda: progress.advance(task)
