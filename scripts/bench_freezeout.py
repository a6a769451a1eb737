"""FreezeOut's time saved: experiment=freezeout against the same one-LR cosine run without freezing
(experiment=full schedule.warmup=0), same model, data, epochs and seed, one process; prints the wall
seconds of training (evaluation excluded), the ratio and both final val accuracies.

    python scripts/bench_freezeout.py      # EfficientNet-Lite0 (offline), the embedded digits at 96 px, 6 epochs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trained(overrides: list[str], out: Path) -> tuple[float, float]:
    """(training seconds over all epochs, final val accuracy)."""
    from hydra import compose, initialize_config_dir

    from finetune.engine.loop import Run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = Run(cfg, out)
    summary = run.fit()
    images = run.plan.steps_per_epoch * run.data.batch_size
    return sum(images / m["images_per_s"] for m in run.state.metrics), summary["final_val_acc"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "freezeout")
    args = p.parse_args(argv)
    from finetune.config.schema import register_configs

    register_configs()
    base = ["model=efficientnet_lite0", "data=digits", f"epochs={args.epochs}", "progress=false", "overwrite=true",
            "channels_last=true", *args.set]
    frozen_s, frozen_acc = trained([*base, "experiment=freezeout"], args.out / "freezeout")
    full_s, full_acc = trained([*base, "experiment=full", "schedule.warmup=0"], args.out / "full")
    print(f"freezeout: {frozen_s:.1f} s of training, val acc {frozen_acc:.3f}")
    print(f"full (no freezing): {full_s:.1f} s of training, val acc {full_acc:.3f}")
    print(f"freezeout / full training time: {frozen_s / full_s:.2f}")


if __name__ == "__main__":
    main()
