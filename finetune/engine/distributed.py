"""Several processes, one run: torchrun's environment, the process group, and the few collectives a run
needs. With one process (no torchrun) every function here is a no-op returning its input, so the
single-device path stays exactly what it was.

Each rank holds a replica; DistributedDataParallel averages the gradients in the ONE backward pass.
DDP registers only the parameters that require grad when it is built, so `wrap` is called again at
every freeze change (finetune/engine/step.py), on every rank at the same step: a parameter unfrozen later
would otherwise never be all-reduced and the replicas would drift apart without an error.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from finetune.base.checksum import bit_sum
from finetune.base.errors import UserError
from finetune.data.sampling import mix_seed


@dataclass(frozen=True)
class World:
    """This process's place: rank among `size` processes, `local_rank` on its node (its GPU)."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes the run directory, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env(environ=os.environ) -> World:
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE (also what submitit's TorchDistributedEnvironment exports
    for a SLURM job with several tasks); one process when they are absent."""
    try:
        size = int(environ.get("WORLD_SIZE", 1))
        rank = int(environ.get("RANK", 0))
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise UserError(f"RANK={rank}, WORLD_SIZE={size}: the rank must lie in [0, WORLD_SIZE)")
    return World(rank, local, size)


def device_name(name: str, world: World) -> str:
    """Under torchrun, `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK."""
    if not world.enabled or name not in ("auto", "cuda"):
        return name
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:  # the scheduler gave this process one GPU of its own (SLURM --gpus-per-task=1)
            return "cuda:0"
        if world.local_rank >= count:
            raise UserError(f"LOCAL_RANK={world.local_rank} but this process sees {count} GPUs; start at most "
                            "one process per GPU (torchrun --nproc_per_node)")
        return f"cuda:{world.local_rank}"
    if name == "cuda":
        raise UserError("device=cuda but no CUDA device is available (use device=auto or cpu)")
    return "cpu"


def init(world: World, device: torch.device, timeout_minutes: float = 30.0) -> None:
    """Join torchrun's rendezvous (env://): NCCL for GPUs, gloo for the CPU."""
    if not world.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"WORLD_SIZE={world.size} but {key} is not set: start several processes with "
                            "torchrun (torchrun --nproc_per_node=N -m finetune train ...)")
    dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size,
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    # every rank's (host, pid): when a collective fails, a survivor can name the rank that died (on its node).
    # Process-wide, as the process group it describes is.
    _ROSTER[:] = gather((socket.gethostname(), os.getpid()))


_ROSTER: list[tuple[str, int]] = []


def _gone(pid: int) -> bool:
    """The process ended: no such pid, or a zombie torchrun has not reaped yet (it polls every few seconds)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): the signal-0 probe, which sees a zombie as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def lost_ranks(roster: list[tuple[str, int]] | None = None) -> list[int] | None:
    """The ranks on this node whose process has ended, from the roster init() gathered ([]: none here, so
    the lost one ran on another node); None without a roster."""
    roster = _ROSTER if roster is None else roster
    if not roster:
        return None
    here = socket.gethostname()
    return [rank for rank, (host, pid) in enumerate(roster) if host == here and _gone(pid)]


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _ROSTER.clear()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """A DDP wrapper over the parameters that require grad NOW; the model itself with one process or when
    nothing trains (DDP refuses a module without trainable parameters)."""
    if not active() or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    # DDP's default buffer sync: every forward starts from rank 0's BatchNorm statistics, as a resume does
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if active():
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s torch seed once the replicas are built (rank 0 keeps `seed`'s own stream position)."""
    return mix_seed(seed, 0x7E57, rank)


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over ranks (in place where distributed)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks of a few numbers (flags, negated step numbers): one collective."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(facts: dict) -> None:
    """Every rank holds the same `facts` ({what: value}: the class list, the data's size, the config's
    fingerprint), or a UserError on every rank names the first rank and what differs from rank 0: ranks that
    see other data would train one model on two label sets (same class count) or fail inside DDP."""
    every = gather(facts)
    problem = _difference(every)
    if problem is None:
        return
    try:  # every rank past the gather before any leaves; one that left first already said the same
        barrier()
    except Exception:
        pass
    raise UserError(problem)


def _difference(every: list[dict]) -> str | None:
    """The first fact a rank holds otherwise than rank 0, in words; None when they all agree."""
    for rank, theirs in enumerate(every[1:], start=1):
        for what, value in every[0].items():
            if theirs.get(what) != value:
                return (f"rank {rank} sees another {what} than rank 0 ({_short(theirs.get(what))} against "
                        f"{_short(value)}): every process must see the same data and config (data.root on each "
                        "node, the same command line)")
    return None


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def broadcast(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def sync_buffers(*modules: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: each rank updated its own with its own shard
    in the last forward, and evaluation and checkpoints must describe one model."""
    if not active():
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def fingerprint(module: nn.Module) -> int:
    """An exact checksum of every parameter's bits: replicas that differ in one bit almost surely differ
    here. The bits are summed as integers on the tensors' device, so it costs one pass over the weights."""
    # position-weighted so that swapped tensors change the sum too
    return int(sum(bit_sum(p).cpu() * (i % 1009 + 1) for i, p in enumerate(module.parameters())))


def check_replicas(model: nn.Module, where: str) -> list[int]:
    """Every rank's fingerprint; an error naming the ranks when they differ (the replicas drifted apart)."""
    prints = gather(fingerprint(model))
    differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if differ:
        raise RuntimeError(f"the model replicas differ {where}: rank(s) {differ} do not match rank 0; "
                           "please report this as a finetune bug")
    return prints
