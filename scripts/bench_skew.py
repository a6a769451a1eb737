"""Skewed classes: plain cross-entropy vs balanced class weights vs the balanced sampler vs logit adjustment
vs the default (auto), on a single-label set made skewed 10:1 (val balanced), several seeds; balanced
accuracy and macro F1 of the last epoch (finetune/bench/skew.py).

    python scripts/bench_skew.py --root ../shared/data/dtd10 --largest 40           # the docs' table
    python scripts/bench_skew.py --quick                                              # seconds: a smoke run

Goals: the default within one standard error of the best method's balanced accuracy, and at least plain
cross-entropy's + 0.03. Results land in OUT/results.jsonl as each run ends; a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from finetune.bench.skew import METHODS, run  # noqa: E402


def quick_folder(root: Path) -> Path:
    """A tiny image folder of generated images, 3 classes x 12 train and 4 val."""
    from PIL import Image

    from finetune.data.datasets import synthetic_images

    for split, n, stream in (("train", 36, 0), ("val", 12, 1)):
        images, labels = synthetic_images(n, 3, 16, stream)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class_{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dtd10"), help="an ImageFolder root")
    ap.add_argument("--largest", type=int, default=40, help="train images of the largest class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="bench_out/skew")
    ap.add_argument("--quick", action="store_true", help="a tiny random-init model on generated images, 1 seed")
    ap.add_argument("extra", nargs="*", help="more overrides for every run (epochs=3 ...)")
    args = ap.parse_args()
    extra = list(args.extra)
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="bench_skew_"))
        args.root, args.out, args.largest, args.seeds = str(quick_folder(scratch / "data")), str(scratch / "out"), 12, [0]
        extra = ["model=resnet18", "model.weights=null", "data.image_size=16", "epochs=1", "batch_size=8",
                 "data.num_workers=0", "auto.folds=2", *extra]
    result = run(Path(args.root), Path(args.out), args.largest, args.seeds, args.methods, extra)
    print(f"train images per class {result['counts']['train_counts']}; val balanced")
    print(result["table"])
    print(json.dumps(result["verdict"]))


if __name__ == "__main__":
    main()
