"""The progress bar a newcomer watches: at 80 and 120 columns, mid-epoch, the step counter, the elapsed
and remaining time and the head's LR stay visible; log lines print above the bar, not into it."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from finetune.output.progress import EpochProgress

GROUPS = ["stem", *[f"blocks_{i}" for i in range(7)], "neck", "head"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def trace(frozen_below: int) -> list[dict]:
    """lp_ft after its head epoch: every group trains, the head at 1e-2, the body at 2e-4."""
    return [{"group": g, "lr": 1e-2 if g == "head" else 2e-4, "trainable": int(i >= frozen_below)}
            for i, g in enumerate(GROUPS)]


@pytest.mark.parametrize("width", [80, 120])
def test_mid_epoch_the_bar_shows_steps_time_and_the_heads_lr(width):
    clock = Clock()
    console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None, get_time=clock)
    bar = EpochProgress(enabled=True, group_names=GROUPS, console=console)
    bar.start_epoch(1, 5, 40)
    for step in range(1, 13):  # 12 of 40 steps, 2 s each
        clock.now += 2.0
        bar.step(step)
    bar.update(12, 0.4123, 0.8611, 35.0, trace(frozen_below=0))
    shown = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    shown.print(bar.progress.make_tasks_table(bar.progress.tasks))
    line = shown.export_text().rstrip("\n")
    bar.stop()
    assert len(line.splitlines()) == 1 and len(line) <= width, line
    assert "epoch 1 of 0..4" in line and "12/40" in line
    assert "0:00:24" in line and "0:00:56" in line  # elapsed, and 28 steps left at 2 s each
    assert "loss 0.412" in line and "lr head=1.0e-02" in line  # the head's LR first, before the body's


def test_log_lines_print_above_the_bar_and_the_handler_is_given_back():
    out = io.StringIO()
    console = Console(width=100, file=out, force_terminal=True, color_system=None)
    handler = logging.StreamHandler(__import__("sys").stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = EpochProgress(enabled=True, group_names=GROUPS, console=console)
        bar.start_epoch(0, 2, 10)
        logging.getLogger("finetune").warning("a warning while the bar is shown")
        bar.stop()
        assert "a warning while the bar is shown" in out.getvalue()
        assert handler.stream is __import__("sys").stderr
    finally:
        root.removeHandler(handler)


def test_without_a_terminal_a_plain_line_comes_every_thirty_seconds(monkeypatch):
    """Piped output (tee, a CI log): before, rich drew every bar at once when the run ended."""
    from finetune.output import progress

    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    console = Console(width=200, file=out, force_terminal=False, color_system=None)
    bar = EpochProgress(enabled=True, group_names=GROUPS, console=console)
    bar.start_epoch(1, 5, 40)
    for step in range(1, 41):  # 40 steps of 2 s: a line at the first step, then every 30 s
        clock.now += 2.0
        bar.step(step)
        if step == 12:
            bar.update(12, 0.4123, 0.8611, 35.0, trace(frozen_below=0))
    bar.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and bar.progress is None
    assert lines[0].startswith("epoch 1 of 0..4: 1/40 (2%), 0:00:02 elapsed, 0:01:18 left")
    assert lines[1].startswith("epoch 1 of 0..4: 16/40 (40%), 0:00:32 elapsed, 0:00:48 left | loss 0.412 | lr head=1.0e-02")


def test_the_log_prefix_is_the_time_alone_on_a_terminal():
    from finetune.output.progress import CompactFormatter

    record = logging.LogRecord("finetune", logging.WARNING, __file__, 1, "disk %s", ("full",), None)
    record.created = 0.0
    terminal, piped = CompactFormatter(terminal=True).format(record), CompactFormatter(terminal=False).format(record)
    assert terminal.endswith(" warning: disk full") and len(terminal) == len("00:00:00 warning: disk full")
    assert piped.startswith("[") and piped.endswith("][finetune][WARNING] - disk full")
