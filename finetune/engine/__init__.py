"""The training engine: one optimizer step (step), the epoch loop (loop), what observes it (listeners),
checkpoints, distributed training, the feature cache, diagnostics, signals and divergence checks."""
