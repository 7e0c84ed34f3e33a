"""Per-batch reseeding: the random numbers of a training step depend on (seed, epoch, batch, rank) only."""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from avmoe.datamodules.sampling import mix_seed

SETUP_KEY = -1  # epoch key of the reseed at setup (epochs are >= 0)


class StepSeeding(Callback):
    """Reseed ``torch`` (CPU and CUDA), ``numpy`` and ``random`` before every training batch.

    The seed is a function of ``(seed, epoch, batch_idx, global_rank)``, so a run resumed from any checkpoint
    (epoch end, every n steps, SIGTERM) draws exactly the dropout masks, drop-path and router noise of the
    uninterrupted run, whatever consumed the global generators in between (validation loaders, callbacks,
    sanity checks). Under DDP the ranks draw different masks (with plain ``seed_everything`` every rank
    starts from the same seed and draws the same masks for different samples).

    It also reseeds once in ``setup`` (rank-independent; DDP broadcasts rank 0's weights anyway), see there.

    Reseeding happens in ``on_train_batch_start``, after the batch was fetched and moved to the device:
    data randomness is the DataModule's business (``avmoe.datamodules.sampling.SeededItems``). Put this
    callback first so that other callbacks' ``on_train_batch_start`` draws are covered too (the CLI does).

    Args:
        seed: base seed; None uses the run's ``seed_everything`` value (``PL_GLOBAL_SEED``) and does nothing
            when the run is not seeded.
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed
        self._base: Optional[int] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        env = os.environ.get("PL_GLOBAL_SEED")
        self._base = self.seed if self.seed is not None else (int(env) if env is not None else None)
        # Callbacks' setup runs after the DataModule's and before the LightningModule's: layers a task builds
        # in setup() (AVQA's vocabulary-sized head) then initialise the same whatever prepare_data/setup of the
        # data drew before (a cache build creates DataLoader iterators, which draw from the global generator).
        if self._base is not None:
            _seed_all(mix_seed(self._base, SETUP_KEY))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._base is not None:
            _seed_all(mix_seed(self._base, trainer.current_epoch, batch_idx, trainer.global_rank))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # CPU and every CUDA device
