"""Per-sample metric state keyed by the stable sample index.

Distributed samplers pad the last batch by repeating samples, so a metric that sums over batches counts those
samples twice. Every official metric here is a function of per-sample values; :class:`PerSampleMetric` stores
them with the sample index, gathers them across ranks (``dist_reduce_fx="cat"``) and keeps the first row of
each index, in index (= dataset) order. A 2-process run therefore reduces exactly the rows a 1-process run
sees.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PerSampleMetric(Metric):
    """Collects ``(index, values)`` rows; :meth:`rows` returns them de-duplicated and sorted by index."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, values: Tensor) -> None:  # index (B,), values (B, K)
        self.index.append(index.detach().long().view(-1))
        self.values.append(values.detach().float().reshape(index.numel(), -1))

    def rows(self) -> tuple[Tensor, Tensor]:
        """Unique sample indices (ascending) and their value rows (first occurrence wins)."""
        index = _cat(self.index).long()
        values = _cat(self.values)
        if index.numel() == 0:
            return index, values.reshape(0, 0)
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        order = torch.arange(index.numel(), device=index.device)
        first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, order, reduce="amin")
        return unique, values[first]


def _cat(x: Tensor | list[Tensor]) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(x) if x else torch.zeros(0)
