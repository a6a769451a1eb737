"""Exact checksums of tensors: the sum of their bits read as integers, computed on the tensor's device.
Equal tensors give equal sums and a changed bit almost surely changes it; the replica check across
processes, freeze integrity and the feature cache's key all use it. And the digest of settings (plain data)
that keys the probe store and the feature cache and lets processes compare their configs."""

from __future__ import annotations

import hashlib
import json

import torch


def digest(obj, length: int = 16) -> str:
    """A hex digest of plain data (dicts, lists, numbers, strings; anything else by its str), key order free."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def bit_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t`'s bits as integers: an int64 scalar on `t`'s device (no transfer)."""
    bits = t.detach().contiguous().view(-1)
    if bits.is_floating_point():
        bits = bits.view(torch.int32) if bits.element_size() % 4 == 0 else bits.view(torch.int16)
    return bits.to(torch.int64).sum()


def fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: bit_sum} of each tensor."""
    return {name: int(bit_sum(t)) for name, t in tensors.items()}
