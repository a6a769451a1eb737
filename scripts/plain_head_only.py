"""The baseline the transfer benchmark is measured against: a plain head-only script, written the way
PyTorch's transfer-learning tutorial does it, on the same offline EfficientNet-Lite0 weights.

    python scripts/plain_head_only.py                      # hymenoptera, seeds 0-2, 1 epoch
    python scripts/plain_head_only.py --epochs 5 --data DIR --train-per-class 30

Frozen backbone in eval mode (its BatchNorm statistics stay ImageNet's), a new linear head, SGD lr 1e-3
momentum 0.9, batch 4, RandomResizedCrop(224) + flip; eval: Resize(256), CenterCrop(224). Inputs are
normalised with mean = std = 0.5, as the weights expect. Prints val accuracy per epoch and the mean over
seeds of the last epoch's; --out gets results.json in the transfer benchmark's format (each finished
seed is kept: a run again continues). Nothing from finetune's training: only its weight loading, and the
benchmark's bookkeeping of runs (finetune.bench).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from omegaconf import OmegaConf  # noqa: E402

from finetune.bench.images import train_subset  # noqa: E402
from finetune.bench.plain import seed_runs  # noqa: E402
from finetune.bench.results import save_results  # noqa: E402
from finetune.config.schema import ModelConfig  # noqa: E402
from finetune.core.groups import build_groups  # noqa: E402
from finetune.models.build import build_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
# the same model preset as `finetune train model=efficientnet_lite0`
LITE0 = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                        OmegaConf.load(ROOT / "conf" / "model" / "efficientnet_lite0.yaml"))


def rgb_loader(path: str):
    return datasets.folder.default_loader(path).convert("RGB")  # one hymenoptera image is palette mode


def image_folders(data: Path, size: int) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """(train, val) as the tutorial builds them: RandomResizedCrop + flip; Resize + CenterCrop."""
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    train_set = datasets.ImageFolder(data / "train", T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]), loader=rgb_loader)
    val_set = datasets.ImageFolder(data / "val", T.Compose(
        [T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), norm]), loader=rgb_loader)
    return train_set, val_set


@torch.no_grad()
def val_accuracy(model: torch.nn.Module, val) -> float:
    return sum((model(x).argmax(1) == y).sum().item() for x, y in val) / len(val.dataset)


def run(data: Path, seed: int, epochs: int, batch_size: int, lr: float, size: int) -> list[float]:
    torch.manual_seed(seed)
    train_set, val_set = image_folders(data, size)
    train = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, num_workers=2)
    val = torch.utils.data.DataLoader(val_set, 32, num_workers=2)

    bundle = build_model(LITE0, len(train_set.classes))
    model = bundle.model.eval()
    params = dict(model.named_parameters())
    head_group = next(g for g in build_groups(model, bundle.group_spec) if g.name == bundle.head_group)
    head = [params[n] for n in head_group.param_names]
    for p in model.parameters():
        p.requires_grad = False
    for p in head:
        p.requires_grad = True
    optimizer = torch.optim.SGD(head, lr=lr, momentum=0.9)
    accs = []
    for _ in range(epochs):
        for x, y in train:  # the model stays in eval mode: a frozen backbone keeps its BN statistics
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        accs.append(val_accuracy(model, val))
    return accs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=224)
    add_data_arguments(p, "plain_head_only")
    args = p.parse_args(argv)
    # run's keyword arguments: a finished seed is kept with them, and reused while they stay the same
    stats = seed_runs("plain_head_only", range(args.seeds), args.out / "runs", run, {
        "data": chosen_data(args), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "size": args.size})
    save_results({stats.recipe: stats}, args.out / "results.json")
    print(f"plain head-only, {args.epochs} epoch(s), {args.seeds} seed(s): mean val acc {stats.mean:.4f}")


def add_data_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """--train-per-class and --out, shared by both plain baselines."""
    p.add_argument("--train-per-class", type=int, default=None,
                   help="the same N train images per class as bench_transfer.py --train-per-class N")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / name,
                   help="results.json and each finished run (kept: a run again continues)")


def chosen_data(args) -> Path:
    """--data, or with --train-per-class the transfer benchmark's own seeded choice of its files."""
    data = args.data.expanduser().resolve()
    return train_subset(data, args.train_per_class, args.out) if args.train_per_class else data


if __name__ == "__main__":
    main()
