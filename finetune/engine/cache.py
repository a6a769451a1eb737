"""The frozen-prefix feature cache: while the new head alone trains above a frozen body, the body's output
for a sample does not change, so it is computed once per sample (and view) and the head trains on it.
An epoch then costs the head's forward and backward instead of the whole network's forward.

It is valid, and used without being asked (`cache=false` turns it off), when in an epoch:
- the head is the only trainable group (lp_ft's linear-probe epoch, unfreeze=1, gradual's first epochs)
  and no BatchNorm parameter below it trains (freeze.train_bn);
- the body's forward is a function of the image alone: its BatchNorm layers in eval mode (frozen groups'
  are, see Freezing), no active dropout or stochastic depth in it;
- the train transform is deterministic (data.augment=false), or the augmentations repeat every
  `cache_views` epochs: with cache_views=K, epoch e draws sample i's augmentation from (seed, e mod K, i),
  cached or not, so the cache holds K views;
- one process (under torchrun the head's gradients must go through DDP).
Otherwise the log says why it is off. Features are held in memory, or with `cache_dir=DIR` in
memory-mapped files there (reused by a later run whose model, data and views are the same: each entry's
files carry crc32 checksums written last and checked before use, a damaged entry is computed again, and a
lock lets one run fill a key while another waits for it), in fp32 or with `cache_dtype` fp16/bf16. A cached epoch's evaluation scores the head on the val set's cached
features; the weight average's body, once it differs from the live one, runs on the images.

`head_init=lbfgs` fits the new head to convergence on the cached features first (multinomial logistic
regression, L-BFGS, a little L2), so fine-tuning starts from the best linear probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from finetune.base.checksum import digest, fingerprints
from finetune.base.errors import UserError
from finetune.config.schema import CacheDtype
from finetune.output.progress import bar

log = logging.getLogger("finetune")
DTYPES = {CacheDtype.fp32: torch.float32, CacheDtype.fp16: torch.float16, CacheDtype.bf16: torch.bfloat16}


def _stochastic(module: nn.Module) -> bool:
    """A layer that draws random numbers in train mode: dropout or stochastic depth with p > 0."""
    p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
    p = p if p is not None else getattr(module, "drop_prob", None)
    return bool(p) and module.training


def reason_off(cfg, trainer, head_name: str, head: nn.Module | None, world) -> str | None:
    """Why the cache cannot serve the epoch the trainer is set up for (None: it can); the model is in its
    modes. `head`: the head group's module, `head_name` its name (None, "": no single module)."""
    model = trainer.model
    if not cfg.cache:
        return "cache=false"
    if head is None:
        return "the head group is not one module"
    mask = trainer.mask
    if not mask[-1] or any(mask[:-1]):
        return "groups below the head train"
    if not isinstance(head, nn.Linear):
        return f"the head is a {type(head).__name__}, not a Linear layer"
    body_params = [p for n, p in model.named_parameters() if not n.startswith(f"{head_name}.")]
    if any(p.requires_grad for p in body_params):
        return "BatchNorm parameters below the head train (freeze.train_bn)"
    inside_head = {id(m) for m in head.modules()}
    for module in model.modules():
        if id(module) in inside_head:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training:
            return "a BatchNorm layer below the head uses batch statistics"
        if _stochastic(module):
            return f"{type(module).__name__} below the head is active"
    if float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:  # timm's functional dropout before the classifier
        return "the model's dropout before the head (drop_rate) is active"
    if trainer.mix is not None:
        return "data.mixup / data.cutmix mix images, not features"
    if cfg.data.augment and not cfg.cache_views:
        return "data.augment=true draws new crops every epoch (cache_views=K caches K augmented views)"
    if world.enabled:
        return "several processes (the head's gradients must go through DDP)"
    return None


class _Features(Dataset):
    """(feature vector, label) by the training sampler's (index, epoch) keys: view epoch mod K."""
    def __init__(self, views: list, labels: torch.Tensor):
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, epoch = key
        # stored in fp16/bf16 to save memory; the head computes in its own precision (autocast on GPUs)
        row = self.views[epoch % len(self.views)][index]
        row = row.float() if isinstance(row, torch.Tensor) else torch.from_numpy(np.array(row, dtype=np.float32))
        label = self.labels[index]  # a class index, or a multilabel 0/1 vector
        return row, int(label) if label.dim() == 0 else label


def _head_inputs(trainer, head: nn.Module, loader):
    """(the head's input, flattened; labels on the CPU) per batch of `loader`, through the whole model
    with a forward pre-hook on the head."""
    captured = {}
    hook = head.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    try:
        for x, y in loader:
            x, y = trainer.to_device(x, y)
            with trainer.autocast():
                trainer.model(x)
            yield captured["x"].flatten(1), y.cpu()
    finally:
        hook.remove()


def as_tensor(view) -> torch.Tensor:
    """One cached view as a float32 tensor (a copy when it is a memory-mapped file)."""
    return view.float() if isinstance(view, torch.Tensor) else torch.from_numpy(np.array(view, dtype=np.float32))


class FeatureCache:
    """Built on the first epoch that can use it; serves every such epoch's batches. Its inputs: the run's
    config, its trainer (model, freeze state, device), the head group's module and the run's data."""

    def __init__(self, cfg, trainer, head_name: str, head: nn.Module | None, data, world):
        self.cfg, self.trainer, self.head_name, self.head, self.data, self.world = cfg, trainer, head_name, head, data, world
        if cfg.cache_views is not None and cfg.cache_views < 1:
            raise UserError(f"cache_views must be >= 1 (null: cache only a deterministic transform), got {cfg.cache_views}")
        self.views: list | None = None
        self.labels: torch.Tensor | None = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None  # the val set's features and labels
        self.key: str | None = None  # of the body the features were computed with
        self.said: set[str] = set()
        self.build_seconds = 0.0

    def reason_off(self) -> str | None:
        return reason_off(self.cfg, self.trainer, self.head_name, self.head, self.world)

    def usable(self, epoch: int) -> bool:
        why = self.reason_off()
        if why is None and (self.views is None or self._key() != self.key):  # a body trained since: rebuild
            self.build()
        if why not in self.said:  # each reason (and "on") once
            self.said.add(why)
            log.info("feature cache: %s", f"off in epoch {epoch}: {why}" if why else
                     f"on from epoch {epoch} (the head alone trains above a frozen body; built in "
                     f"{self.build_seconds:.1f} s)")
        return why is None

    def val_loader(self) -> DataLoader:
        """The val set's cached features in order (evaluation of the head alone)."""
        features, labels = self.val
        return DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=self.data.batch_size * 2)

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        sampler = self.data.train_sampler(epoch, start_step)
        return DataLoader(_Features(self.views, self.labels), batch_size=self.data.batch_size, sampler=sampler,
                          drop_last=self.data.drop_last)

    # ------------------------------------------------------------------------------------ building

    def _key(self) -> str:
        cfg = self.cfg
        body = {n: p for n, p in self.trainer.model.state_dict().items() if not n.startswith(f"{self.head_name}.")}
        parts = {"model": cfg.model.name, "source": cfg.model.source, "body": sum(fingerprints(body).values()),
                 "data": str(cfg.data), "views": cfg.cache_views or 1, "seed": cfg.seed,
                 "dtype": cfg.cache_dtype, "n": len(self.data.train)}
        return digest(parts, 16)

    @torch.no_grad()
    def build(self) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.key = self._key()
        self.val = self._val_features(DTYPES[cfg.cache_dtype])
        if not cfg.cache_dir:
            self.views, self.labels = self._compute(None)
        else:  # one run fills a key at a time; the others wait, then read what it finished
            store = Path(cfg.cache_dir).expanduser() / self.key
            with store_lock(store):
                self.views, self.labels = self._reuse(store) or self._fill(store)
        self.build_seconds = time.perf_counter() - t0
        shape = tuple(self.views[0].shape)
        log.info("feature cache: %d images x %d view(s) x %d features (%s, %s) in %.1f s", shape[0], len(self.views),
                 shape[1], cfg.cache_dtype, Path(cfg.cache_dir).expanduser() / self.key if cfg.cache_dir else
                 "in memory", self.build_seconds)

    def _reuse(self, store: Path):
        """The stored views and labels, checked against the checksums written last; None when there are
        none, or (one warning, and the entry is removed) when a file no longer matches them."""
        if not store.is_dir():
            return None
        try:
            views, labels = read_store(store, self.cfg.cache_views or 1)
        except DamagedEntry as err:
            log.warning("feature cache: %s is damaged (%s); computing the features again", store, err)
            shutil.rmtree(store, ignore_errors=True)
            return None
        log.info("feature cache: reusing %s", store)
        return views, labels

    def _fill(self, store: Path):
        """Compute into a private folder beside the entry, checksum it, then rename it into place: a reader
        never sees half-written files, and an interrupted fill leaves no entry."""
        tmp = store.with_name(f".{store.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            views, labels = self._compute(tmp)
            np.save(tmp / "labels.npy", labels.numpy())
            for out in views:
                out.flush()
            write_checksums(tmp, len(views))
            os.replace(tmp, store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return read_store(store, len(views), verify=False)  # its sums were just computed from these files

    def _compute(self, store: Path | None) -> tuple[list, torch.Tensor]:
        """Every view's features (in memory, or memory-mapped files in `store`) and the labels."""
        cfg, data = self.cfg, self.data
        k, dtype, n = cfg.cache_views or 1, DTYPES[cfg.cache_dtype], len(data.train)
        views, labels = [], self.trainer.task.label_buffer(n)
        with bar(k * -(-n // (data.batch_size * 2)), "caching features", enabled=cfg.progress) as advance:
            for v in range(k):
                loader = DataLoader(data.train, batch_size=data.batch_size * 2,
                                    sampler=[(i, v) for i in range(n)], num_workers=data.num_workers)
                out, at = None, 0
                for feats, y in _head_inputs(self.trainer, self.head, loader):
                    feats = feats.to(dtype).cpu()
                    if out is None:
                        out = self._allocate(store, v, (n, feats.shape[1]), dtype)
                    out[at:at + len(feats)] = feats.float().numpy() if store is not None else feats
                    labels[at:at + len(y)] = y
                    at += len(feats)
                    advance()
                views.append(out)
        return views, labels

    @torch.no_grad()
    def _val_features(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input for every val image (eval transform; the model in eval mode, as evaluation
        runs it; the body is frozen, so it is the same for the weight average)."""
        model = self.trainer.model
        feats, labels = [], []
        was = [m.training for m in model.modules()]
        model.eval()
        try:
            for f, y in _head_inputs(self.trainer, self.head, self.data.val_loader()):
                feats.append(f.to(dtype).float().cpu())
                labels.append(y)
        finally:
            for m, mode in zip(model.modules(), was):
                m.training = mode
        return torch.cat(feats), torch.cat(labels)

    @staticmethod
    def _allocate(store: Path | None, view: int, shape: tuple[int, int], dtype: torch.dtype):
        if store is None:
            return torch.empty(shape, dtype=dtype)
        store.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float16 if dtype == torch.float16 else np.float32  # numpy has no bf16: stored as fp32
        return np.lib.format.open_memmap(store / f"view{view}.npy", mode="w+", dtype=np_dtype, shape=shape)


# ----------------------------------------------------------------------------- the store on disk (cache_dir)

CHECKSUMS = "checksums.json"  # written last: an entry without it is unfinished
CHUNK = 1 << 22  # bytes per checksum: a damaged chunk is found without trusting the rest


class DamagedEntry(Exception):
    """A stored entry whose files do not match the checksums written with it."""


def _chunk_sums(path: Path) -> list[int]:
    """crc32 of each CHUNK bytes of the file (zlib's: about a GB/s, a small share of computing features)."""
    sums = []
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sums.append(zlib.crc32(chunk))
    return sums


def _entry_files(views: int) -> list[str]:
    return ["labels.npy", *(f"view{v}.npy" for v in range(views))]


def write_checksums(store: Path, views: int) -> None:
    sums = {name: {"bytes": (store / name).stat().st_size, "crc32": _chunk_sums(store / name)}
            for name in _entry_files(views)}
    tmp = store / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums))
    os.replace(tmp, store / CHECKSUMS)


def read_store(store: Path, views: int, verify: bool = True) -> tuple[list, torch.Tensor]:
    """(memory-mapped views, labels) of an entry whose every file matches its checksums; DamagedEntry
    otherwise (a missing checksum file: an entry of an older finetune, or an unfinished one). `verify`
    false: the entry this process has just written and checksummed, opened without reading it again."""
    if not verify:
        return _open_store(store, views)
    try:
        sums = json.loads((store / CHECKSUMS).read_text())
    except (OSError, ValueError):
        raise DamagedEntry(f"no readable {CHECKSUMS}") from None
    for name in _entry_files(views):
        path, want = store / name, sums.get(name)
        if want is None or not path.is_file():
            raise DamagedEntry(f"{name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise DamagedEntry(f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written")
        bad = next((i for i, (a, b) in enumerate(zip(_chunk_sums(path), want["crc32"])) if a != b), None)
        if bad is not None:
            raise DamagedEntry(f"{name} differs from what was written at byte {bad * CHUNK}")
    return _open_store(store, views)


def _open_store(store: Path, views: int) -> tuple[list, torch.Tensor]:
    try:
        return ([np.load(store / f"view{v}.npy", mmap_mode="r") for v in range(views)],
                torch.from_numpy(np.load(store / "labels.npy")))
    except ValueError as err:  # a header that no longer describes the data
        raise DamagedEntry(str(err)) from None


@contextlib.contextmanager
def store_lock(store: Path):
    """An exclusive lock on `store`'s key (a `.lock` file beside it) while it is read or filled: a second
    run on the same key waits, then reuses what the first wrote, instead of computing it again."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(f".{store.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("feature cache: another run is filling %s; waiting for it", store)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fit_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, task, l2: float = 1e-4,
             steps: int = 100, weighted: bool = False) -> float:
    """The head fitted on the features to convergence under the task's loss (full-batch L-BFGS; single-label:
    multinomial logistic regression), the best linear probe as a starting point; `weighted`: under the
    task's training loss (class weights) instead of the plain one. Returns the final training loss."""
    params = [p for p in head.parameters()]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    x, y = features.float(), labels

    def closure():
        opt.zero_grad()
        weight = head.weight.flatten(1) if hasattr(head, "weight") else params[0]
        loss = (task.loss if weighted else task.plain_loss)(head(x), y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    head.train(False)  # no dropout while fitting
    opt.step(closure)
    head.train(True)
    with torch.no_grad():
        return float(task.plain_loss(head(x), y))
