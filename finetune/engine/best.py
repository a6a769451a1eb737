"""Which evaluation is the best so far, and when a run stops early: pure functions of the metric rows,
so a resumed run finds the same answers again from its checkpoint's metrics."""

from __future__ import annotations

from finetune.base.errors import UserError
from finetune.config.schema import BestMetric

# metrics best_metric may name, and whether more is better
BEST_METRICS = {metric: not metric.endswith("loss") for metric in BestMetric}
BEST = "best.pt"


def check_metric(metric: str, ema: bool) -> None:
    """The metric exists in this run (an unknown name never gets here: the schema's enum refuses it)."""
    if metric.startswith("live_") and not ema:
        raise UserError(f"best_metric={metric} exists only with a weight average (set ema_half_life)")


def best_epoch(metrics: list[dict], key: str, min_delta: float = 0.0) -> int:
    """The epoch whose `key` first beat every earlier best by more than `min_delta` last."""
    higher = BEST_METRICS[key]
    best, at = None, 0
    for i, row in enumerate(metrics):
        value = row[key] if higher else -row[key]
        if best is None or value > best + min_delta:
            best, at = value, i
    return at


def last_is_best(rows: list[dict], key: str) -> bool:
    return best_epoch(rows, key) == len(rows) - 1


def early_stop(metrics: list[dict], key: str, patience: int, min_delta: float) -> str | None:
    """Why the run ends after these epochs (None: it goes on): `patience` epochs in which `key` gained
    no more than `min_delta` (patience 0: never)."""
    if not patience:
        return None
    waited = len(metrics) - 1 - best_epoch(metrics, key, min_delta)
    if waited < patience:
        return None
    return (f"early stopping: {key} has not improved by more than {min_delta:g} for {waited} epochs (best at epoch "
            f"{len(metrics) - 1 - waited})")
