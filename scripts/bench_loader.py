"""The train loader's images per second (one worker) with and without draft decoding, against images
already in memory, on 12-megapixel camera photos and on small photos, in one run
(finetune/bench/loader.py measures).

    python scripts/bench_loader.py                        # hymenoptera's photos, 24 of them, 224 px
    python scripts/bench_loader.py --data DIR --images 48 --size 224 --repeats 3

Goals: draft decoding at least 3x the full decode on the 12-megapixel photos, and no slower on small ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from finetune.bench.loader import make_photos, measure, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hymenoptera"),
                    help="an ImageFolder whose train photos are used (upscaled for the camera-sized set)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=224, help="the training input size")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one loader worker's work, on one core
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # data.cache_resized's copies: gone after
        sets = {"4000x3000 JPEG": make_photos(Path(args.data), Path(tmp) / "large", args.images, (4000, 3000)),
                "small (as shared)": make_photos(Path(args.data), Path(tmp) / "small", args.images, None)}
        results = {name: measure(root, args.size, args.repeats) for name, root in sets.items()}
    print(f"{args.images} train photos, {args.size} px, one worker; images/s (median of {args.repeats}):")
    print(table(results))
    large, small = results["4000x3000 JPEG"], results["small (as shared)"]
    print(f"resized cache {large['resized'] / large['full']:.2f}x full on 12 MP photos after a one-off "
          f"{large['resize_s']:.1f} s")
    print(f"draft >= 3x full on 12 MP photos: {'met' if large['draft'] >= 3 * large['full'] else 'MISSED'} "
          f"({large['draft'] / large['full']:.2f}x)")
    print(f"draft no slower on small photos: {'met' if small['draft'] >= 0.95 * small['full'] else 'MISSED'} "
          f"({small['draft'] / small['full']:.2f}x; 0.95 allows for noise)")


if __name__ == "__main__":
    main()
