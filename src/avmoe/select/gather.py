"""Which pool batches a rank embeds, and the gather of every rank's batches by batch number (torch only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

Batches = dict[int, tuple[Tensor, Tensor]]  # batch number -> (audio (b, Ca), visual (b, Cv))


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def rank_batches(n_batches: int, rank: int, world_size: int) -> list[int]:
    """Batch k of the fixed batching goes to rank ``k mod world_size``: batches never depend on the world size."""
    return list(range(rank, n_batches, world_size))


def gather_batches(mine: Batches, n_batches: int) -> tuple[Tensor, Tensor]:
    """All ranks' batches, concatenated in batch order (every rank returns the same tensors)."""
    size, _ = world()
    merged = dict(mine)
    if size > 1:
        parts: list = [None] * size
        dist.all_gather_object(parts, mine)
        for part in parts:
            merged.update(part)
    missing = [k for k in range(n_batches) if k not in merged]
    if missing:
        raise RuntimeError(f"feature batches {missing[:10]} were embedded by no rank")
    return (torch.cat([merged[k][0] for k in range(n_batches)]), torch.cat([merged[k][1] for k in range(n_batches)]))
