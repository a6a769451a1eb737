"""The second plain baseline of the transfer benchmark: a full fine-tune written the usual way, at the best
of three learning rates, on the same offline EfficientNet-Lite0 weights.

    python scripts/plain_full.py                          # hymenoptera, LRs 3e-4 1e-3 3e-3, seeds 0-2, 5 epochs
    python scripts/plain_full.py --data DIR --lrs 1e-4,1e-3,1e-2 --train-per-class 30

Every parameter trains from the start: AdamW (weight decay 0.01) with one cosine schedule per step, batch
32, RandomResizedCrop + flip, BatchNorm in train mode (what a hand-written loop does); eval: Resize,
CenterCrop. Inputs normalised with mean = std = 0.5, as the weights expect. For each LR it prints val
accuracy per epoch per seed; the LR with the best mean final accuracy is reported as the baseline. The
best is chosen on the val set: generous to the baseline, so a recipe that beats it beats it honestly.
--out gets results.json in the transfer benchmark's format (the best LR's runs) and every finished run
(kept: a run again continues). Nothing from finetune's training: only its weight loading, and the
benchmark's bookkeeping of runs (finetune.bench).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from plain_head_only import (  # noqa: E402
    LITE0,
    add_data_arguments,
    chosen_data,
    image_folders,
    val_accuracy,
)

from finetune.bench.plain import best_lr, lr_runs  # noqa: E402
from finetune.bench.results import save_results  # noqa: E402
from finetune.models.build import build_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def run(data: Path, seed: int, epochs: int, lr: float, size: int) -> list[float]:
    torch.manual_seed(seed)
    train_set, val_set = image_folders(data, size)
    train = torch.utils.data.DataLoader(train_set, 32, shuffle=True, num_workers=1, drop_last=len(train_set) > 32)
    val = torch.utils.data.DataLoader(val_set, 64, num_workers=1)
    model = build_model(LITE0, len(train_set.classes)).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train))
    accs = []
    for _ in range(epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        accs.append(val_accuracy(model, val))
    return accs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    add_data_arguments(p, "plain_full")
    args = p.parse_args(argv)
    # run's keyword arguments: a finished seed is kept with them, and reused while they stay the same
    by_lr = lr_runs("plain_full", range(args.seeds), args.out / "runs", run, {
        "data": chosen_data(args), "epochs": args.epochs, "lr": [float(v) for v in args.lrs.split(",")],
        "size": args.size})
    best = best_lr(by_lr)
    save_results({"plain_full": by_lr[best]}, args.out / "results.json")
    print(f"plain full fine-tune, best of {len(by_lr)} LRs: lr {best:g}, mean val acc {by_lr[best].mean:.4f} "
          f"(std {by_lr[best].std:.4f}, {args.seeds} seeds, {args.epochs} epochs)")


if __name__ == "__main__":
    main()
