"""The transfer benchmark in the five regimes a default recipe must hold in (issue: recipes across
domains): near-ImageNet photos, a far-off domain, textures, and steel defects with few and with many
images per class. Each regime is one `bench_transfer.py` run with `--reuse`, so an interrupted
benchmark (hours on 2 cores) continues where it stopped:

    python scripts/bench_regimes.py                      # every regime, every recipe, 3 seeds
    python scripts/bench_regimes.py --regimes dtd10,neu6_30 --recipes lp_ft,full
    python scripts/bench_regimes.py --plain              # the two plain baselines, every regime
    python scripts/bench_regimes.py --rescore-auto       # auto's probes only, scored by the record's runs

Results: bench_out/regimes/<regime>/ (results.md, results.json, val_acc.png), or --out. `--report` merges
whatever has finished there into the committed record, docs/regimes/ (<regime>.json, a recipe's newer
runs replacing its older), and writes from the record each regime's table (<regime>.md) and plot, and
summary.md (recipe x regime, and where the default loses) and summary.png. To keep working
on the code while it runs, run it from a snapshot: git worktree add /tmp/bench HEAD, then
python /tmp/bench/scripts/bench_regimes.py --out $PWD/bench_out/regimes.

The regimes, --rescore-auto and --report are finetune.bench's (regimes, record); this is their command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import bench_transfer  # noqa: E402  (a sibling script: their folder is first on sys.path)

from finetune.bench.record import report  # noqa: E402
from finetune.bench.regimes import (  # noqa: E402
    REGIMES,
    folder,
    lookup,
    plain_args,
    regime_args,
    rescore_auto,
)
from finetune.bench.runs import MODEL  # noqa: E402

DATA = ROOT.parent / "shared" / "data"  # the regimes' datasets, beside the checkout
OUT = ROOT / "bench_out" / "regimes"
DOCS = ROOT / "docs" / "regimes"  # the committed record: every regime's runs, tables, plots


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument("--plain", action="store_true",
                   help="the two plain baselines (scripts/plain_head_only.py, plain_full.py) instead of the recipes")
    p.add_argument("--rescore-auto", action="store_true",
                   help="only auto's probes: score auto by the record's runs of the recipes it chose "
                        "(after a change to the probe; --report then merges them)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--model", default=MODEL, help="a conf/model preset (efficientnet_lite1, ...): results in "
                   "<regime>_lite1/, the record in <regime>_lite1.json and summary_lite1.md")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (one per regime inside)")
    p.add_argument("--report", action="store_true",
                   help="only merge the finished runs in --out into --docs and write its tables and plots")
    p.add_argument("--docs", type=Path, default=DOCS,
                   help="the record --report keeps: <regime>.json, .md and _val_acc.png, summary.md and .png")
    args = p.parse_args(argv)
    regimes = args.regimes.split(",")
    for regime in regimes:
        lookup(regime)  # an unknown regime fails before hours of runs
    if args.report:
        print(report(args.out, regimes, args.docs, args.model))
        return
    if args.rescore_auto:
        for regime in regimes:
            rescore_auto(regime, DATA, args.out, args.docs, args.seeds, args.epochs, args.model)
        return
    if args.plain and args.model != MODEL:
        p.error("--plain: the plain baselines train EfficientNet-Lite0 only")
    for regime in regimes:
        print(f"== {regime}", flush=True)
        here = args.out / folder(regime, args.model)
        if args.plain:
            import plain_full
            import plain_head_only

            common = [*plain_args(regime, DATA, args.out), "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
            plain_head_only.main([*common, "--out", str(here / "plain_head_only")])
            plain_full.main([*common, "--out", str(here / "plain_full")])
            continue
        extra = ["--recipes", args.recipes] if args.recipes else []
        bench_transfer.main([*regime_args(regime, DATA, args.out), "--out", str(here), "--seeds",
                             str(args.seeds), "--epochs", str(args.epochs), "--model", args.model, "--reuse", *extra])


if __name__ == "__main__":
    main()
