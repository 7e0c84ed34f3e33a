"""Collectives and rank-identical randomness for the balancing callbacks.

DDP averages gradients during backward and never re-broadcasts parameters, so anything that edits ``.grad``
afterwards must compute the same function on every rank: statistics are all-reduced (or gathered) before use,
noise comes from a generator seeded identically on all ranks, and no rank skips a collective the others run.

Also home of :class:`ParameterChecksum`, a debugging callback that writes a per-rank digest of the model
parameters so that tests (and users chasing a divergence) can check that replicas are still identical.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from avmoe.files import write_json_atomic


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _collective_device(t: Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: Tensor, op: str) -> Tensor:
    if not is_distributed():
        return t.clone()
    out = t.detach().to(_collective_device(t)).clone()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out.to(t.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all ranks (a copy; ``t`` itself is untouched). Identity without DDP."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise max of ``t`` over all ranks (a copy). Identity without DDP."""
    return _all_reduce(t, "MAX")


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate the rows of ``t`` (N_r, ...) from every rank in rank order; N_r may differ per rank."""
    if not is_distributed():
        return t.clone()
    dev = _collective_device(t)
    local = t.detach().to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=dev))
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(t.device)


def dedup_by_index(index: Tensor, *columns: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of every sample index (DistributedSampler pads by repeating samples), sorted by index."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    order = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, order, reduce="amin")
    return (unique, *(c[first] for c in columns))


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, identical in every process (unlike ``hash()`` of strings)."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def shared_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator seeded from ``keys``: pass only rank-independent keys to get the same stream on every rank."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(*keys))
    return gen


def parameter_digest(module: torch.nn.Module) -> dict[str, Any]:
    """SHA-256 of every parameter's bytes (exact equality), plus a float64 sum for human reading."""
    sha = hashlib.sha256()
    total = 0.0
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        data = p.detach().cpu().contiguous()
        sha.update(name.encode())
        sha.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        total += float(data.double().sum())
    return {"sha256": sha.hexdigest(), "sum": total}


def _plan_digest(plan: dict[str, Any]) -> str:
    sha = hashlib.sha256()
    for key in sorted(plan):
        value = plan[key]
        sha.update(key.encode())
        sha.update(b"none" if value is None else np.ascontiguousarray(value).tobytes())
    return sha.hexdigest()


class ParameterChecksum(Callback):
    """Debugging aid: write ``<dirpath>/rank<r>.json`` with a digest of the parameters of every rank.

    The digest also covers the DataModule's train plan (``train_plan_sha256``) when one is set, so a
    re-sampling callback that built different plans on different ranks shows up too.

    Use it to check that DDP replicas stay identical (they must, unless a callback edits gradients with
    rank-local statistics or noise). The file is rewritten every ``every_n_steps`` optimizer steps and at
    the end of fit; each write lists the digests seen so far by global step.

    Args:
        dirpath: output folder; None writes to ``<trainer.log_dir or default_root_dir>/checksums``.
        every_n_steps: also write after every n-th optimizer step (0: only at the end of fit).
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_steps: int = 0) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.history: dict[int, dict[str, Any]] = {}

    def _folder(self, trainer: Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank calls this at the same point.
        return Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checksums"))

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        digest = parameter_digest(pl_module)
        plan = getattr(trainer.datamodule, "train_plan", None) if trainer.datamodule is not None else None
        if plan is not None:
            digest["train_plan_sha256"] = _plan_digest(plan)
        self.history[trainer.global_step] = digest
        payload = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                   "steps": {str(k): v for k, v in sorted(self.history.items())}}
        write_json_atomic(self._folder(trainer) / f"rank{trainer.global_rank}.json", payload)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step not in self.history:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)
