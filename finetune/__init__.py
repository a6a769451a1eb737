"""finetune: config-driven fine-tuning of pretrained vision models (layer groups, freezing, per-group
LRs and schedules, through one optimizer).

    import finetune
    cfg = finetune.compose(["model=resnet18", "unfreeze=5"])  # the config `finetune train model=resnet18 unfreeze=5` trains
    summary = finetune.train(cfg, "runs/r18")                  # the run directory; returns summary.json's content

Importing finetune loads nothing heavy: these two names are looked up on first use.
"""

__all__ = ["compose", "train"]


def __getattr__(name: str):
    if name == "compose":
        from finetune.commands.compose import compose

        return compose
    if name == "train":
        from finetune.commands.train import train

        return train
    raise AttributeError(f"module 'finetune' has no attribute '{name}'")
