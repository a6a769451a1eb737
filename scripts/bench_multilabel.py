"""Multi-label: finetune's default against plain full fine-tuning with binary cross-entropy on 2x2 mosaics
of real texture tiles (1 to 4 labels each), the same images, weights and epochs, several seeds; mAP and
macro F1 of the last epoch (finetune/bench/mosaics.py). fastai's multi-label fine_tune is the third peer the
goal names; it runs in a venv of its own (not part of finetune), which this script does not set up.

    python scripts/bench_multilabel.py                 # dtd10 tiles: 300 train, 200 val mosaics, 3 seeds
    python scripts/bench_multilabel.py --quick         # seconds: a smoke run

Goal: the default's mAP >= plain full BCE's + 0.02. Results land in OUT/results.jsonl as each run ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from finetune.bench.mosaics import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dtd10"), help="an ImageFolder root")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench_out/multilabel")
    ap.add_argument("--quick", action="store_true", help="generated tiles, a tiny random-init model, 1 seed")
    ap.add_argument("extra", nargs="*", help="more overrides for every run (epochs=3 ...)")
    args = ap.parse_args()
    extra = list(args.extra)
    if args.quick:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_skew import quick_folder

        scratch = Path(tempfile.mkdtemp(prefix="bench_multilabel_"))
        args.root, args.out, args.train, args.val, args.seeds = (str(quick_folder(scratch / "data")),
                                                                 str(scratch / "out"), 24, 12, [0])
        extra = ["model=resnet18", "model.weights=null", "data.image_size=32", "epochs=1", "batch_size=8",
                 "data.num_workers=0", *extra]
    result = run(Path(args.root), Path(args.out), {"train": args.train, "val": args.val}, args.seeds, extra)
    print(f"{result['mosaics']['images']} mosaics of {len(result['mosaics']['classes'])} classes' tiles")
    print(result["table"])
    print(json.dumps(result["verdict"]))


if __name__ == "__main__":
    main()
