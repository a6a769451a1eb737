"""finetune's LR finder beside torch-lr-finder's on the same model, data order and sweep.

    pip install torch-lr-finder
    python scripts/compare_lr_find.py                 # EfficientNet-Lite0 (offline weights) on the digits
    python scripts/compare_lr_find.py --steps 60 --set data.image_size=64

torch-lr-finder sets one LR for every parameter, so the comparison uses one LR for every group
(experiment=full: all groups train at `lr`, no spread); both sweep the same exponential range for the
same steps from the same weights, and both smooth the loss the same way (finetune: debiased EMA with
beta 0.98; torch-lr-finder: smooth_f=0.02 of the same EMA, not debiased). Prints both suggestions
(steepest descent for both, and finetune's valley) and their ratio; writes lr_find_compare.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start", type=float, default=1e-6)
    p.add_argument("--end", type=float, default=1.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "lr_find_compare")
    args = p.parse_args(argv)
    try:
        from torch_lr_finder import LRFinder, TrainDataLoaderIter
    except ImportError:
        raise SystemExit("needs torch-lr-finder: pip install torch-lr-finder")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from hydra import compose, initialize_config_dir

    from finetune.config.schema import register_configs
    from finetune.engine.loop import Run
    from finetune.recipes import lr_find

    register_configs()
    overrides = ["model=efficientnet_lite0", "data=digits", "experiment=full", "lr_spread.kind=none",
                 "progress=false", f"lr_find.steps={args.steps}", f"lr_find.start={args.start}",
                 f"lr_find.end={args.end}", *args.set]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(lr_find.provisional(cfg), args.out / "run")
    run.trainer.set_epoch(0)
    start_weights = copy.deepcopy(run.model.state_dict())
    ours = lr_find.find(run, cfg.lr_find)  # leaves the model as it was: torch-lr-finder starts from the same

    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in start_weights.items())
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=args.start, weight_decay=cfg.optimizer.weight_decay)
    finder = LRFinder(run.model, optimizer, torch.nn.CrossEntropyLoss(), device=run.device)
    class EpochOrder(TrainDataLoaderIter):  # epoch after epoch in finetune's data order, as ours ran
        epoch = 0

        def __next__(self):
            try:
                return self.inputs_labels_from_batch(next(self._iterator))
            except StopIteration:
                self.epoch += 1
                self._iterator = iter(run.data.train_loader(self.epoch))
                return self.inputs_labels_from_batch(next(self._iterator))

    finder.range_test(EpochOrder(run.data.train_loader(0)), start_lr=args.start, end_lr=args.end, num_iter=args.steps, step_mode="exp",
                      smooth_f=0.02, diverge_th=cfg.lr_find.diverge)
    import numpy as np

    theirs_lr, theirs_loss = finder.history["lr"], finder.history["loss"]
    skip_start, skip_end = 10, 5  # torch-lr-finder's own suggestion: steepest gradient past these
    window = theirs_loss[skip_start:-skip_end] if len(theirs_loss) > skip_start + skip_end else theirs_loss
    theirs = theirs_lr[skip_start + int(np.gradient(np.array(window)).argmin())]
    finder.reset()
    run.data.close()

    print(f"finetune:         valley {ours['valley']:.3g}, steepest {ours['steepest']:.3g} ({len(ours['lrs'])} steps)")
    print(f"torch-lr-finder:  steepest {theirs:.3g} ({len(theirs_lr)} steps)")
    print(f"ratio of the steepest-descent suggestions (finetune / torch-lr-finder): {ours['steepest'] / theirs:.2f}")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ours["lrs"], ours["smoothed"], label=f"finetune (valley {ours['valley']:.2g}, steepest {ours['steepest']:.2g})")
    ax.plot(theirs_lr, theirs_loss, label=f"torch-lr-finder (steepest {theirs:.2g})", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed train loss")
    ax.set_ylim(top=max(ours["smoothed"][0], theirs_loss[0]) * 1.3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out / "lr_find_compare.png", dpi=110)
    print(f"wrote {args.out / 'lr_find_compare.png'}")


if __name__ == "__main__":
    main()
