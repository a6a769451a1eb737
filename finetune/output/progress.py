"""Rich progress bar per epoch (loss, accuracy, images/s, LR per group) and the final summary table."""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

log = logging.getLogger("finetune")


class EpochProgress:
    def __init__(self, enabled: bool, group_names: Sequence[str], console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.group_names = list(group_names)
        self.progress: Progress | None = None
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                transient=False,
            )
            self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done,
                                           epoch=f"{epoch + 1}/{epochs}", info="")

    def update(self, done: int, loss: float, acc: float, images_per_s: float, trace: Sequence[dict]) -> None:
        if self.progress is None:
            return
        lrs = " ".join(f"{r['group']}={r['lr']:.1e}" + ("" if r["trainable"] else "*") for r in trace)
        self.progress.update(self.task, completed=done,
                             info=f"loss {loss:.3f} acc {acc:.3f} {images_per_s:.0f} img/s | lr {lrs}")

    def end_epoch(self, metrics: dict) -> None:
        line = (f"loss {metrics['train_loss']:.3f} acc {metrics['train_acc']:.3f} | val loss "
                f"{metrics['val_loss']:.3f} val acc {metrics['val_acc']:.3f} | {metrics['images_per_s']:.0f} img/s")
        log.info("epoch %d: %s", metrics["epoch"], line)  # also in the run's log file
        if self.progress is not None:
            self.progress.update(self.task, info=line)

    def stop(self) -> None:
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
    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task(what, total=total)
    with progress:
        yield lambda: progress.advance(task)
