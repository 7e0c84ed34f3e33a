"""Reproducible, rank-aware and resumable sampling for the train and evaluation loaders.

Three pieces, used by :class:`~avmoe.datamodules.base.AVDataModule`:

- :class:`EpochSampler`: this rank's shard of a permutation that is a function of ``(seed, epoch)`` only, so a
  resumed run draws the same order as an uninterrupted one. A ``DistributedSampler`` subclass, so Lightning
  neither replaces nor wraps it under DDP; it yields ``(epoch, index)`` keys for :class:`SeededItems`.
- :class:`SeededItems`: the random numbers a Dataset draws while loading item ``index`` in ``epoch`` (torch,
  numpy, ``random``) come from a seed derived from ``(seed, epoch, index)``: the same with 0 or 8 workers, on
  any rank, and after a mid-epoch resume (worker RNG streams restart when workers are re-created).
- :class:`ResumableDataLoader`: implements ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``
  protocol, which the fit loop saves in ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``).
  It counts the batches it has *handed to the loop*, not the indices its sampler produced: with
  ``num_workers > 0`` the workers run ``prefetch_factor`` batches ahead, and those are not consumed yet. A
  restored loader skips the consumed batches of that epoch at the sampler (nothing is decoded twice).

The underlying iterator is created lazily at the first ``next()``: Lightning calls ``iter()`` on the train
loader in ``FitLoop.setup_data`` *before* it calls ``set_epoch`` for the epoch (and, after a restore, does not
call ``iter()`` again); a worker iterator created there would already have prefetched the wrong epoch's order.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from typing import Any, Iterator, Optional, Sized

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_REDRAWN = ("the interrupted epoch is drawn again from its first batch (Lightning ends it after the number of "
             "batches it had left)")
EVAL_EPOCH = -1
"""Epoch key of evaluation items (their randomness depends on the index only)."""


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; the same in every process (unlike ``hash()``), no ``seed + epoch`` aliasing."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's global RNG and ``random`` for the block, then restore them.

    Only the CPU generator (``torch.default_generator``), never ``torch.manual_seed``: that would also reseed the
    CUDA generators of the main process (``num_workers=0``), which the model's dropout draws from.
    """
    torch_state = torch.default_generator.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededItems(Dataset):
    """Wraps a map-style Dataset: item randomness is a function of ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (from :class:`EpochSampler`) or plain indices (evaluation, epoch
    :data:`EVAL_EPOCH`).

    Args:
        dataset: the wrapped Dataset.
        seed: base seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (EVAL_EPOCH, key)
        with seeded_rngs(mix_seed(self.seed, epoch, index)):
            return self.dataset[int(index)]


class EpochSampler(DistributedSampler):
    """This rank's shard of the ``(seed, epoch)`` permutation, optionally starting part-way into the shard.

    Same layout as ``torch.utils.data.DistributedSampler`` (the permutation is padded by repeating its head to
    a multiple of ``num_replicas``; rank ``r`` takes positions ``r, r + W, ...``), but the permutation comes
    from :func:`mix_seed` ``(seed, epoch)`` instead of ``seed + epoch``. Yields ``(epoch, index)`` pairs.

    Args:
        dataset: a sized Dataset.
        num_replicas: world size.
        rank: this process's global rank.
        shuffle: permute (train) or keep dataset order.
        seed: base seed of the permutation.
        drop_last: drop the tail instead of padding to a multiple of ``num_replicas``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0
        """Positions of this rank's shard to skip in the next iteration (set by :class:`ResumableDataLoader`)."""

    def order(self) -> list[int]:
        """The whole epoch's (padded or truncated) order over all ranks."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            return order[: self.total_size]
        pad = self.total_size - n
        return order + (order * math.ceil(pad / max(n, 1)))[:pad]

    def shard(self) -> list[int]:
        """This rank's indices for the epoch (all of them, ignoring ``start``)."""
        return self.order()[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return iter([(epoch, i) for i in self.shard()[self.start :]])


class _LazyCountingIterator:
    """Creates the DataLoader iterator at the first ``next()`` and counts the batches handed out."""

    def __init__(self, loader: "ResumableDataLoader") -> None:
        self._loader = loader
        self._it: Optional[Iterator[Any]] = None

    def __iter__(self) -> "_LazyCountingIterator":
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._loader._start_epoch()
        batch = next(self._it)
        self._loader._delivered += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is checkpointed (see the module docstring).

    Takes the arguments of ``torch.utils.data.DataLoader``; the sampler should be an :class:`EpochSampler`
    (any other sampler works, without mid-epoch resume). ``len()`` is always the full epoch, as Lightning's
    batch counting expects; a restored iterator just yields fewer batches.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._delivered = 0
        self._epoch = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches already consumed) from a checkpoint

    @property
    def epoch_sampler(self) -> Optional[EpochSampler]:
        """The :class:`EpochSampler` that makes this loader resumable, or None."""
        ok = isinstance(self.sampler, EpochSampler) and self.batch_size is not None
        return self.sampler if ok else None  # type: ignore[return-value]

    def __iter__(self) -> _LazyCountingIterator:  # type: ignore[override]
        return _LazyCountingIterator(self)

    def _start_epoch(self) -> Iterator[Any]:
        sampler, skip = self.epoch_sampler, 0
        if sampler is not None:
            epoch = sampler.epoch
            if self._resume is not None and self._resume[0] == epoch:
                skip = self._resume[1]
            sampler.start = skip * int(self.batch_size or 1)
            self._epoch = epoch
            if self.generator is not None:  # worker base seeds: a function of (seed, epoch, rank, position)
                self.generator.manual_seed(mix_seed(sampler.seed, epoch, sampler.rank, skip))
        self._resume = None
        self._delivered = skip
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self._epoch, "batches": self._delivered, "batch_size": self.batch_size,
                                 "dataset_size": len(self.dataset)}  # type: ignore[arg-type]
        sampler = self.epoch_sampler
        if sampler is not None:
            state.update(num_replicas=sampler.num_replicas, seed=sampler.seed, shuffle=sampler.shuffle)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.epoch_sampler is None:
            rank_zero_warn(f"{type(self).__name__}: sampler {type(self.sampler).__name__} cannot resume mid-epoch; "
                           f"{_REDRAWN}")
            return
        current = self.state_dict()
        keys = ("batch_size", "dataset_size", "num_replicas", "seed", "shuffle")
        changed = {k: (state_dict.get(k), current[k]) for k in keys if state_dict.get(k) != current[k]}
        if changed:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's train loader differs ({changed}, saved vs now); "
                           f"cannot continue the interrupted epoch at the same sample: {_REDRAWN}")
            return
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
