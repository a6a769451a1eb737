"""What adapters save (scripts/bench_peft.py): full fine-tuning, LoRA and the head alone on one model, each
measured in a process of its own so that one's peak memory cannot hide another's.

Per mode: the parameters that train, the optimizer's state (AdamW: two moments per trained parameter), the
peak resident memory a training step adds to the process (parameters, gradients, optimizer state and
activations: the growth of the peak RSS over the process before the model was built) and the median time
of a training step (forward, backward, optimizer). The model and its groups come from finetune's own
setup, so LoRA is exactly what `peft=lora` trains: adapters in every group below the head, the head whole.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODES = ("full", "lora", "head")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(mode: str, model: str, batch: int, size: int, steps: int, rank: int, target: str = "") -> dict:
    """One mode in this process: trainable parameters, optimizer state bytes, peak RSS growth, step time."""
    import peft  # noqa: F401  (imported by every mode before the baseline: its import is not a step's memory)

    from finetune.commands.compose import compose
    from finetune.core.freeze import apply_trainable
    from finetune.core.optim import build_optimizer, param_groups
    from finetune.engine.setup import build_parts

    torch.manual_seed(0)
    before = _rss_mib()
    overrides = ["model=timm", f"model.name={model}", "model.weights=null", "data=synthetic",
                 f"data.image_size={size}", "data.num_classes=10", "experiment=none", "device=cpu"]
    if mode == "lora":
        overrides += ["peft=lora", f"peft.r={rank}", *([f"peft.target={target}"] if target else [])]
    cfg = compose(overrides, probe=False)
    bundle, groups, _ = build_parts(cfg)
    net = bundle.model.train()
    mask = [True] * len(groups) if mode != "head" else [False] * (len(groups) - 1) + [True]
    apply_trainable(net, groups, mask)
    optimizer = build_optimizer(cfg.optimizer, param_groups(net, groups, [1e-4] * len(groups), [0.01] * len(groups)))
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}  # the tensors autograd keeps for the backward pass, by storage: activations

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for step in range(steps + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(net(x), y)
        activations = sum(saved.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {"mode": mode, "params": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "optimizer_bytes": state, "activation_bytes": activations,
            # what a step holds at its peak (the end of the forward pass, before gradients free activations):
            # weights, the last step's gradients are freed (zero_grad(set_to_none)), optimizer state,
            # activations; then the backward pass turns activations into gradients
            "memory_bytes": param_bytes + state + max(activations, grad_bytes),
            "peak_rss_mib": _rss_mib() - before, "step_s": statistics.median(times)}


def run_all(model: str, batch: int, size: int, steps: int, rank: int, target: str = "") -> list[dict]:
    """Every mode, each in a child process (`python -m finetune.bench.adapters MODE ...`)."""
    out = []
    for mode in MODES:
        child = subprocess.run([sys.executable, "-m", "finetune.bench.adapters", mode, model, str(batch), str(size),
                                str(steps), str(rank), target], capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(f"{mode}: {child.stderr[-2000:]}")
        out.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return out


def _ratio(a: float, b: float) -> str:
    # a tiny model's step may not raise the process's peak RSS at all (imports set it): no ratio then
    return f"{a / b:.2f}" if b > 0 else "n/a"


def table(rows: list[dict]) -> str:
    """Markdown: each mode's numbers and its ratio to full fine-tuning."""
    full = next(r for r in rows if r["mode"] == "full")
    lines = ["| | trainable params | optimizer state | activations | peak memory | peak RSS growth | step time |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def mib(key, r):
        return f"{r[key] / 2**20:.1f} MiB ({r[key] / max(1, full[key]):.3f})"

    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['trainable']:,} ({r['trainable'] / full['trainable']:.2%}) "
            f"| {mib('optimizer_bytes', r)} | {mib('activation_bytes', r)} | {mib('memory_bytes', r)} "
            f"| {r['peak_rss_mib']:.0f} MiB ({_ratio(r['peak_rss_mib'], full['peak_rss_mib'])}) "
            f"| {r['step_s']:.2f} s ({_ratio(r['step_s'], full['step_s'])}) |")
    return "\n".join(lines)


if __name__ == "__main__":  # one mode, in a child process of run_all
    mode, model, batch, size, steps, rank, target = sys.argv[1:8]
    print(json.dumps(measure(mode, model, int(batch), int(size), int(steps), int(rank), target)))
