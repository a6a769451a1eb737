"""Which evaluation is the best so far, and when a run stops early: pure functions of the metric rows,
so a resumed run finds the same answers again from its checkpoint's metrics."""

from __future__ import annotations

from finetune.base.errors import UserError

BEST = "best.pt"


def resolve_metric(metric: str, task, ema: bool) -> str:
    """best_metric as the run's rows name it: `auto` is the task's main metric (val_acc, val_map); a metric
    the task or the run does not measure is one line with the ones it does."""
    metric = str(metric)
    if metric == "auto":
        return f"val_{task.main}"
    val = [f"val_{m}" for m in ("loss", *task.metrics)]
    known = [*val, "train_loss", f"train_{task.train_metric}", *(f"live_{m}" for m in val)]
    if metric.startswith("live_") and not ema and metric in known:
        raise UserError(f"best_metric={metric} exists only with a weight average (set ema_half_life)")
    if metric not in known:
        choices = [m for m in known if ema or not m.startswith("live_")]
        raise UserError(f"best_metric={metric}: task {task.name} measures {', '.join(choices)}")
    return metric


def higher_is_better(metric: str) -> bool:
    return not metric.endswith("loss")


def best_epoch(metrics: list[dict], key: str, min_delta: float = 0.0) -> int:
    """The epoch whose `key` first beat every earlier best by more than `min_delta` last."""
    higher = higher_is_better(key)
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
