"""The second plain baseline of the transfer benchmark: a full fine-tune written the usual way, at the best
of three learning rates, on the same offline EfficientNet-Lite0 weights.

    python scripts/plain_full.py                          # hymenoptera, LRs 3e-4 1e-3 3e-3, seeds 0-2, 5 epochs
    python scripts/plain_full.py --data DIR --lrs 1e-4,1e-3,1e-2 --train-per-class 30

Every parameter trains from the start: AdamW (weight decay 0.01) with one cosine schedule per step, batch
32, RandomResizedCrop + flip, BatchNorm in train mode (what a hand-written loop does); eval: Resize,
CenterCrop. Inputs normalised with mean = std = 0.5, as the weights expect. For each LR it prints val
accuracy per epoch per seed; the LR with the best mean final accuracy is reported as the baseline. The
best is chosen on the val set: generous to the baseline, so a recipe that beats it beats it honestly.
Nothing from finetune but the weight loading.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from plain_head_only import LITE0, rgb_loader  # noqa: E402

from finetune.models import build_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def few_per_class(dataset: datasets.ImageFolder, n: int | None, seed: int = 123) -> None:
    """Keep `n` train images per class (the same seeded choice for every LR and seed)."""
    if not n:
        return
    by_class: dict[int, list] = {}
    for sample in dataset.samples:
        by_class.setdefault(sample[1], []).append(sample)
    kept = []
    for samples in by_class.values():
        samples = sorted(samples)
        random.Random(seed).shuffle(samples)
        kept += samples[:n]
    dataset.samples = dataset.imgs = sorted(kept)
    dataset.targets = [c for _, c in dataset.samples]


def run(data: Path, seed: int, epochs: int, lr: float, size: int, per_class: int | None) -> list[float]:
    torch.manual_seed(seed)
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    train_set = datasets.ImageFolder(data / "train", T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]), loader=rgb_loader)
    few_per_class(train_set, per_class)
    val_set = datasets.ImageFolder(data / "val", T.Compose(
        [T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), norm]), loader=rgb_loader)
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
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
        accs.append(correct / len(val_set))
    return accs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train-per-class", type=int, default=None)
    args = p.parse_args(argv)
    means = {}
    for lr in (float(v) for v in args.lrs.split(",")):
        finals = []
        for seed in range(args.seeds):
            accs = run(args.data, seed, args.epochs, lr, args.size, args.train_per_class)
            finals.append(accs[-1])
            print(f"lr {lr:g} seed {seed}: val acc per epoch " + " ".join(f"{a:.3f}" for a in accs), flush=True)
        means[lr] = (statistics.fmean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0)
        print(f"lr {lr:g}: mean {means[lr][0]:.4f} std {means[lr][1]:.4f}", flush=True)
    best = max(means, key=lambda k: means[k][0])
    print(f"plain full fine-tune, best of {len(means)} LRs: lr {best:g}, mean val acc {means[best][0]:.4f} "
          f"(std {means[best][1]:.4f}, {args.seeds} seeds, {args.epochs} epochs)")


if __name__ == "__main__":
    main()
