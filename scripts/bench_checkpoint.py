"""Checkpoint save and load seconds against the number of steps trained: the checkpoint as finetune writes
it now (the LR trace streamed to lr_trace.csv, none in the checkpoint) beside the same checkpoint with
the whole trace inside, as it was. Also the cost of streaming the trace: seconds per 1000 steps of rows.

    python scripts/bench_checkpoint.py                       # 1k, 10k, 50k, 150k steps x 15 groups
    python scripts/bench_checkpoint.py --steps 1000 300000 --with-trace-max 300000

Ratios are measured in one run (the machine is noisy); "beyond the weights" is a checkpoint's time minus
that of the same checkpoint with only the tensors (model, optimizer state).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from finetune.base import files
from finetune.engine import checkpoint
from finetune.output.trace import TraceFile

GROUPS = 15
STEPS_PER_EPOCH = 1000


def tensors() -> dict:
    """resnet18's weights and AdamW state after a step: the part of a checkpoint that does not grow."""
    model = torchvision.models.resnet18(weights=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def rows(steps: int) -> list[dict]:
    return [{"step": s, "epoch": s // STEPS_PER_EPOCH, "group": f"g{g}", "lr": 1e-3 * (1 - s / steps),
             "momentum": 0.9, "trainable": 1} for s in range(steps) for g in range(GROUPS)]


def checkpoint_dict(weights: dict, steps: int, with_trace: bool) -> dict:
    epochs = max(1, steps // STEPS_PER_EPOCH)
    metrics = [{"epoch": e, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.85,
                "seconds": 12.5, "images_per_s": 300.0} for e in range(epochs)]
    out = {**weights, "format": checkpoint.FORMAT, "step": steps, "epoch": epochs, "metrics": metrics,
           "rng": checkpoint.rng_state(), "trace_file": "/runs/x/lr_trace.csv"}
    if with_trace:
        out["trace"] = rows(steps)
    return out


def timed_save_load(obj: dict, path: Path) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    files.atomic_save(obj, path)
    t1 = time.perf_counter()
    files.safe_load(path)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, path.stat().st_size


def stream_seconds_per_1000_steps(directory: Path) -> float:
    trace = TraceFile(directory / "lr_trace.csv")
    trace.start()
    step_rows = rows(1)
    t0 = time.perf_counter()
    for _ in range(1000):
        trace.write(step_rows)
    trace.flush()
    trace.close()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 10_000, 50_000, 150_000])
    p.add_argument("--with-trace-max", type=int, default=50_000,
                   help="the trace-inside layout only up to this many steps (2.25M rows take minutes)")
    args = p.parse_args()
    torch.set_num_threads(1)
    weights = tensors()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_save, base_load, base_size = timed_save_load(weights, tmp / "weights.pt")
        print(f"tensors only (resnet18 + AdamW state): save {base_save:.3f} s, load {base_load:.3f} s, "
              f"{base_size / 2**20:.1f} MiB")
        print(f"{'steps':>8} {'rows':>9} | {'now: save s':>11} {'load s':>7} {'beyond weights s':>16} {'MiB':>6} | "
              f"{'trace inside: save s':>20} {'load s':>7} {'MiB':>6} | load ratio")
        for steps in args.steps:
            now = timed_save_load(checkpoint_dict(weights, steps, False), tmp / "now.pt")
            beyond = max(0.0, now[0] - base_save) + max(0.0, now[1] - base_load)
            line = (f"{steps:>8} {steps * GROUPS:>9} | {now[0]:>11.3f} {now[1]:>7.3f} {beyond:>16.3f} "
                    f"{now[2] / 2**20:>6.1f} | ")
            if steps <= args.with_trace_max:
                old = timed_save_load(checkpoint_dict(weights, steps, True), tmp / "old.pt")
                line += f"{old[0]:>20.3f} {old[1]:>7.3f} {old[2] / 2**20:>6.1f} | {old[1] / now[1]:.1f}x"
            else:
                line += f"{'(skipped)':>20} {'':>7} {'':>6} |"
            print(line, flush=True)
        print(f"streaming the trace: {stream_seconds_per_1000_steps(tmp):.3f} s per 1000 steps of {GROUPS} rows")


if __name__ == "__main__":
    main()
