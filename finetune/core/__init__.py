"""The pure core of fine-tuning: layer groups, which groups train when (freeze), LR schedules, the
per-group optimizer, the plan that joins them, and the weight average. No data, no files."""
