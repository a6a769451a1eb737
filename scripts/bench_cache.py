"""The frozen-prefix feature cache's speed: head-only epochs on cached features against the same epochs
recomputing the frozen body (goal: >= 10x), in one process, the same model and data.

    python scripts/bench_cache.py        # EfficientNet-Lite0 (offline weights), 224 px, hymenoptera, CPU

Both runs train `unfreeze=1` with data.augment=false (the case the cache serves without views) for
--epochs epochs; the cached run's first epoch includes building the cache, reported apart. Prints the
seconds per epoch of each, the build time, the ratio, and that both ended with the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def epoch_seconds(cfg, out: Path) -> tuple[list[float], float, dict]:
    """Training seconds of each epoch (images / images_per_s of metrics.csv: the evaluation and building
    the cache not included), the cache's build time, the final weights."""
    from finetune.engine.loop import Run

    run = Run(cfg, out)
    run.fit()
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    images = run.plan.steps_per_epoch * run.data.batch_size
    train = [images / m["images_per_s"] for m in run.state.metrics]
    whole = [m["seconds"] for m in run.state.metrics]  # with the evaluation (on cached val features too)
    return train, whole, run.cache.build_seconds, weights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "cache")
    args = p.parse_args(argv)
    import torch
    from hydra import compose, initialize_config_dir

    from finetune.config.schema import register_configs

    register_configs()
    base = ["model=efficientnet_lite0", "data=imagefolder", f"data.root={args.data}", "data.augment=false",
            "experiment=none", "unfreeze=1", f"epochs={args.epochs}", "progress=false", "channels_last=true",
            "diag_every=0", "overwrite=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        plain_cfg = compose("train", overrides=[*base, "cache=false"])
        cached_cfg = compose("train", overrides=base)
    plain, plain_whole, _, w_plain = epoch_seconds(plain_cfg, args.out / "recompute")
    cached, cached_whole, build, w_cached = epoch_seconds(cached_cfg, args.out / "cached")
    diff = max(float((w_plain[k].float() - w_cached[k].float()).abs().max()) for k in w_plain)
    per_plain, per_cached = statistics.median(plain), statistics.median(cached)
    print(f"recomputing the body: {' '.join(f'{t:.2f}' for t in plain)} s per epoch")
    print(f"on the cache: {' '.join(f'{t:.3f}' for t in cached)} s per epoch (+ {build:.2f} s to build it "
          f"before epoch 0: one forward over the train and the val images)")
    print(f"speed-up of a head-only epoch: {per_plain / per_cached:.0f}x (goal >= 10x); with its evaluation "
          f"{statistics.median(plain_whole) / statistics.median(cached_whole):.0f}x; torch threads "
          f"{torch.get_num_threads()}; largest weight difference at the end {diff:.2e}")


if __name__ == "__main__":
    main()
