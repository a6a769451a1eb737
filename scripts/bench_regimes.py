"""The transfer benchmark in the five regimes a default recipe must hold in (issue: recipes across
domains): near-ImageNet photos, a far-off domain, textures, and steel defects with few and with many
images per class. Each regime is one `bench_transfer.py` run with `--reuse`, so an interrupted
benchmark (hours on 2 cores) continues where it stopped:

    python scripts/bench_regimes.py                      # every regime, every recipe, 3 seeds
    python scripts/bench_regimes.py --regimes dtd10,neu6_30 --recipes lp_ft,full

Results: bench_out/regimes/<regime>/ (results.md, results.json, val_acc.png), or --out. To keep working
on the code while it runs, run it from a snapshot: git worktree add /tmp/bench HEAD, then
python /tmp/bench/scripts/bench_regimes.py --out $PWD/bench_out/regimes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer  # noqa: E402

DATA = bench_transfer.ROOT.parent / "shared" / "data"
OUT = bench_transfer.ROOT / "bench_out" / "regimes"
# regime -> bench_transfer arguments (data, train images per class, image size)
REGIMES = {
    "hymenoptera": ["--data", str(DATA / "hymenoptera")],
    "digits": ["--data", str(OUT / "digits_data"), "--set", "data.image_size=96"],
    "dtd10": ["--data", str(DATA / "dtd10")],
    "neu6_30": ["--data", str(DATA / "neu6"), "--train-per-class", "30"],
    "neu6_200": ["--data", str(DATA / "neu6")],
}


def regime_args(regime: str, out: Path) -> list[str]:
    """bench_transfer's data arguments of `regime`, its derived data (digits) under `out`, made if need be."""
    if regime not in REGIMES:
        raise SystemExit(f"unknown regime {regime}; choose from {', '.join(REGIMES)}")
    if regime == "digits" and not (out / "digits_data" / "train").is_dir():
        bench_transfer.make_digits(out / "digits_data")
    return [a.replace(str(OUT), str(out)) for a in REGIMES[regime]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="efficientnet_lite0", help="a conf/model preset (efficientnet_lite1, ...)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (one per regime inside)")
    args = p.parse_args(argv)
    for regime in args.regimes.split(","):
        where = regime_args(regime, args.out)
        extra = ["--recipes", args.recipes] if args.recipes else []
        print(f"== {regime}", flush=True)
        bench_transfer.main([*where, "--out", str(args.out / regime), "--seeds", str(args.seeds),
                             "--model", args.model, "--reuse", *extra])


if __name__ == "__main__":
    main()
