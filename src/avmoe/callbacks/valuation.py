"""Sample-level modality valuation and re-sampling (CVPR 2024, GeWu-Lab/Valuate-And-Enhance-Multimodal-Cooperation ``code/sample_level.py``, ``code/modality_level.py``).

At the end of every training epoch the whole train split is valued with the model in eval mode: for each
sample, the head is run on both modalities, on audio alone and on visual alone (the missing modality's
*features* zeroed, as the official ``exec_drop``; ``unimodal="task"`` uses the task's own uni-modal
predictions instead, e.g. its auxiliary heads), the value function is ``v(S) = |S| * correct(S)``
(``correct`` from :meth:`AVTask.sample_correct`, in [0, 1]; 0/1 for single-label tasks) and the two-player
Shapley contributions are

    phi_a = (v(a) + v(av) - v(v)) / 2,   phi_v = (v(v) + v(av) - v(a)) / 2,   phi_a + phi_v = v(av).

They are logged (TensorBoard histograms ``valuation/phi_audio``/``phi_visual`` and epoch means) and saved to
``<run folder>/valuation/epoch_<NNN>.npz``. From epoch ``warmup_epochs - 1`` on, the next epoch's train set is
rebuilt through :meth:`AVDataModule.set_train_plan` (all originals plus uni-modal copies):

- ``sample`` level: per sample and modality u, copies in which only u is kept: 1 if ``0.4 < phi_u < 1``,
  2 if ``-0.1 < phi_u < 0.4``, 3 if ``phi_u < -0.1`` and none otherwise (the official strict inequalities:
  the boundaries 0.4 and -0.1, reachable with fractional correctness such as AVE's, give no copy);
- ``modality`` level: over a random ``part_ratio`` subset (drawn with replacement, as official), ``gap_u = 1 - mean(phi_u)``; ``int(|gap_a - gap_v|
  * 2/3 * alpha * N)`` random samples (with replacement) are copied keeping only the modality with the
  larger gap.

DDP: each rank values its shard (``DistributedSampler(shuffle=False)``), ``(index, correctness)`` rows are
gathered, sampler padding is removed by sample index, and the plan is built from the gathered table with a
generator seeded by ``(seed, epoch)``: every rank builds the same list, so every rank sees the same epoch length.

Resume: the valuation of epoch e runs in ``on_train_epoch_end``, after validation has written epoch e's
checkpoint. A run resumed from such a checkpoint values epoch e in ``on_train_start`` instead (its weights are
exactly those at the end of epoch e), so it trains epoch e + 1 on the same plan as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from avmoe._private_api import drop_cached_train_loader
from avmoe.callbacks._distributed import all_gather_rows, dedup_by_index, is_distributed, mix_seed, rank, world_size
from avmoe.callbacks.ogm import _forward_context, check_contract, eval_mode
from avmoe.datamodules.batch import INDEX, SKIPPED, batch_size, collate

Resample = Literal["sample", "modality", "none"]


def shapley_contributions(correct_av: Tensor, correct_a: Tensor, correct_v: Tensor) -> tuple[Tensor, Tensor]:
    """Two-player Shapley values with ``v(S) = |S| * correct(S)``; inputs (N,) in [0, 1] -> ``(phi_a, phi_v)``."""
    v_av, v_a, v_v = 2 * correct_av, correct_a, correct_v
    return 0.5 * (v_a + v_av - v_v), 0.5 * (v_v + v_av - v_a)


def sample_level_copies(phi: np.ndarray) -> np.ndarray:
    """Uni-modal copies per sample from its contribution, with the official strict inequalities
    (``AV_KS_Dataset_sample_level``, ``code/datasets/dataloader.py``): 1 if ``0.4 < phi < 1``, 2 if
    ``-0.1 < phi < 0.4``, 3 if ``phi < -0.1``, else 0, so the boundaries 0.4, -0.1 and phi >= 1 get none."""
    copies = np.zeros(phi.shape, dtype=np.int64)
    copies[(phi > 0.4) & (phi < 1.0)] = 1
    copies[(phi > -0.1) & (phi < 0.4)] = 2
    copies[phi < -0.1] = 3
    return copies


def sample_level_plan(index: np.ndarray, phi_a: np.ndarray, phi_v: np.ndarray,
                      num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices, audio_mask, visual_mask)``: all originals, then audio-only and visual-only copies."""
    copies_a, copies_v = sample_level_copies(phi_a), sample_level_copies(phi_v)
    audio_only = np.repeat(index, copies_a)  # low audio contribution: train audio alone on that sample
    visual_only = np.repeat(index, copies_v)
    return _plan(num_samples, audio_only, visual_only)


def modality_level_plan(index: np.ndarray, phi_a: np.ndarray, phi_v: np.ndarray, num_samples: int,
                        part_ratio: float, alpha: float, rng: np.random.Generator,
                        part_replace: bool = True) -> tuple[np.ndarray, ...]:
    """``(indices, audio_mask, visual_mask)`` of the modality-level variant (see module docstring).

    The ``part_ratio`` subset is drawn with replacement as the official ``np.random.choice(N, num)``
    (``code/modality_level.py``); ``part_replace=False`` draws distinct samples."""
    part = rng.choice(len(index), size=max(1, int(part_ratio * len(index))), replace=part_replace)
    gap_a, gap_v = 1.0 - float(phi_a[part].mean()), 1.0 - float(phi_v[part].mean())
    count = int(abs(gap_a - gap_v) * (2.0 / 3.0) * alpha * num_samples)
    picked = index[rng.integers(0, len(index), count)] if count else np.zeros(0, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    return _plan(num_samples, picked if gap_a > gap_v else empty, picked if gap_v >= gap_a else empty)


def _plan(num_samples: int, audio_only: np.ndarray, visual_only: np.ndarray) -> tuple[np.ndarray, ...]:
    indices = np.concatenate([np.arange(num_samples), audio_only, visual_only]).astype(np.int64)
    n, na, nv = num_samples, len(audio_only), len(visual_only)
    audio_mask = np.concatenate([np.ones(n), np.ones(na), np.zeros(nv)]).astype(np.float32)
    visual_mask = np.concatenate([np.ones(n), np.zeros(na), np.ones(nv)]).astype(np.float32)
    return indices, audio_mask, visual_mask


class ModalityValuation(Callback):
    """Value each modality's contribution per training sample every epoch and re-sample the weak ones.

    Needs an :class:`~avmoe.datamodules.base.AVDataModule` (``dataset("train")`` and ``set_train_plan``). The
    train loader is rebuilt after each new plan (no need for ``reload_dataloaders_every_n_epochs``).

    Args:
        resample: ``sample`` (per-sample copies), ``modality`` (copies of the lagging modality) or ``none``
            (value and log only).
        warmup_epochs: epochs of plain training; the first plan is built at the end of epoch
            ``warmup_epochs - 1`` (official 5).
        part_ratio: modality level: fraction of the valued samples averaged for the gaps (official 0.2).
        alpha: modality level: scale of the number of copies (official 1).
        part_replace: modality level: draw the ``part_ratio`` subset with replacement (official
            ``np.random.choice``); False draws distinct samples.
        correct_threshold: None uses the task's ``sample_correct`` as is (fractional for AVE segments);
            a value turns it into 0/1 (``correct >= threshold``), the official discrete value function.
        batch_size: valuation batch size; None uses the DataModule's eval batch size.
        num_workers: valuation loader workers; None uses the DataModule's.
        save_dir: folder for ``epoch_<NNN>.npz``; None: ``<trainer.log_dir or default_root_dir>/valuation``.
        log_histograms: add TensorBoard histograms of the contributions (rank 0).
        seed: seed of the modality-level draws (combined with the epoch; identical on all ranks).
        unimodal: ``zero``: a missing modality is zeroed features through the task head (official); ``task``:
            the task's ``unimodal.mode`` (auxiliary heads when it is ``aux``).
    """

    def __init__(
        self,
        resample: Resample = "sample",
        warmup_epochs: int = 5,
        part_ratio: float = 0.2,
        alpha: float = 1.0,
        part_replace: bool = True,
        correct_threshold: Optional[float] = None,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        save_dir: Optional[str] = None,
        log_histograms: bool = True,
        seed: int = 0,
        unimodal: Literal["zero", "task"] = "zero",
    ) -> None:
        if unimodal not in ("zero", "task"):
            raise ValueError(f"unimodal must be 'zero' or 'task', got {unimodal!r}")
        if resample not in ("sample", "modality", "none"):
            raise ValueError(f"resample must be 'sample', 'modality' or 'none', got {resample!r}")
        if not 0.0 < part_ratio <= 1.0:
            raise ValueError(f"part_ratio must lie in (0, 1], got {part_ratio}")
        self.resample = resample
        self.warmup_epochs = warmup_epochs
        self.part_ratio = part_ratio
        self.alpha = alpha
        self.part_replace = part_replace
        self.correct_threshold = correct_threshold
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.save_dir = save_dir
        self.log_histograms = log_histograms
        self.seed = seed
        self.unimodal = unimodal
        self.valued_epoch = -1
        self.table: Optional[dict[str, Tensor]] = None
        """Latest valuation: ``index``, ``phi_audio``, ``phi_visual``, ``correct_av``/``_audio``/``_visual``."""
        self.summary: dict[str, float] = {}

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_contract(pl_module, type(self).__name__)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "dataset") or (self.resample != "none" and not hasattr(dm, "set_train_plan")):
            raise TypeError(f"{type(self).__name__} needs an AVDataModule (dataset('train') and set_train_plan); "
                            f"got {type(dm).__name__}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        previous = trainer.current_epoch - 1
        if previous >= 0 and self.valued_epoch < previous:
            # Resumed from a checkpoint written after epoch `previous` but before its valuation (see module doc).
            self._run(trainer, pl_module, previous, log_scalars=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.valued_epoch < trainer.current_epoch:
            self._run(trainer, pl_module, trainer.current_epoch, log_scalars=True)

    # ---- valuation ----------------------------------------------------------------------------------------
    def _run(self, trainer: Trainer, pl_module: LightningModule, epoch: int, log_scalars: bool) -> None:
        table = self.value(trainer, pl_module)
        self.table, self.valued_epoch = table, epoch
        self.summary = {"phi_audio_mean": float(table["phi_audio"].mean()) if len(table["index"]) else math.nan,
                        "phi_visual_mean": float(table["phi_visual"].mean()) if len(table["index"]) else math.nan,
                        "num_valued": float(len(table["index"]))}
        if self.resample != "none" and epoch >= self.warmup_epochs - 1 and len(table["index"]):
            self._replan(trainer, table, epoch)
        self._save(trainer, table, epoch)
        if log_scalars:
            for name, value in self.summary.items():
                if not math.isnan(value):
                    pl_module.log(f"valuation/{name}", value, on_step=False, on_epoch=True, batch_size=1)

    @torch.no_grad()
    def value(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Value the whole train split (every rank its shard, then gathered and de-duplicated)."""
        rows = []
        with eval_mode(pl_module):
            for batch in self._loader(trainer):  # decoding stays outside autocast (numpy front ends)
                batch.pop(SKIPPED, None)
                if batch_size(batch) == 0:
                    continue
                with _forward_context(trainer):
                    rows.append(self._value_batch(pl_module, move_data_to_device(batch, pl_module.device)))
        local = torch.cat(rows) if rows else torch.zeros((0, 4), dtype=torch.float64)
        gathered = all_gather_rows(local.cpu())
        index, values = dedup_by_index(gathered[:, 0].long(), gathered[:, 1:])
        correct_av, correct_a, correct_v = values.unbind(1)
        phi_a, phi_v = shapley_contributions(correct_av, correct_a, correct_v)
        return {"index": index, "phi_audio": phi_a, "phi_visual": phi_v, "correct_av": correct_av,
                "correct_audio": correct_a, "correct_visual": correct_v}

    def _value_batch(self, pl_module: LightningModule, batch: dict[str, Any]) -> Tensor:
        feats = pl_module.encode(batch)  # eval mode: data masks (all 1 for the plain train split), no hooks
        fused = pl_module.head_forward(feats, batch)
        uni = pl_module.unimodal_outputs(feats, batch, mode="zero" if self.unimodal == "zero" else None)
        cols = [self._correct(pl_module, out, batch) for out in (fused, uni["audio"], uni["visual"])]
        return torch.stack([batch[INDEX].double(), *cols], dim=1).cpu()  # (B, 4)

    def _correct(self, pl_module: LightningModule, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        correct = pl_module.sample_correct(outputs, batch).detach().double().reshape(-1)
        if self.correct_threshold is not None:
            correct = (correct >= self.correct_threshold).double()
        return correct

    def _loader(self, trainer: Trainer) -> DataLoader:
        return split_loader(trainer.datamodule, "train", self.batch_size, self.num_workers)

    # ---- re-sampling --------------------------------------------------------------------------------------
    def _replan(self, trainer: Trainer, table: dict[str, Tensor], epoch: int) -> None:
        dm = trainer.datamodule
        num = dm.dataset_size("train") if hasattr(dm, "dataset_size") else len(dm.dataset("train"))
        index = table["index"].numpy()
        phi_a, phi_v = table["phi_audio"].numpy(), table["phi_visual"].numpy()
        if self.resample == "sample":
            plan = sample_level_plan(index, phi_a, phi_v, num)
        else:
            rng = np.random.default_rng(mix_seed(self.seed, epoch))
            plan = modality_level_plan(index, phi_a, phi_v, num, self.part_ratio, self.alpha, rng,
                                       self.part_replace)
        dm.set_train_plan(*plan)
        _request_train_reload(trainer)
        self.summary.update({"plan_size": float(len(plan[0])),
                             "copies_audio_only": float((plan[2] == 0).sum()),
                             "copies_visual_only": float((plan[1] == 0).sum())})

    # ---- output -------------------------------------------------------------------------------------------
    def _folder(self, trainer: Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must call it.
        return Path(self.save_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "valuation"))

    def _save(self, trainer: Trainer, table: dict[str, Tensor], epoch: int) -> None:
        folder = self._folder(trainer)
        if not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"epoch_{epoch:03d}.npz", epoch=epoch, **{k: v.numpy() for k, v in table.items()})
        if self.log_histograms and len(table["index"]):
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name in ("phi_audio", "phi_visual"):
                        logger.experiment.add_histogram(f"valuation/{name}", table[name], global_step=epoch)

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"valued_epoch": self.valued_epoch, "table": self.table, "summary": dict(self.summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.valued_epoch = int(state_dict.get("valued_epoch", -1))
        self.table = state_dict.get("table")
        self.summary = dict(state_dict.get("summary", {}))


def split_loader(dm: Any, split: str, batch_size: Optional[int], num_workers: Optional[int]) -> DataLoader:
    """An unshuffled loader over ``dm.dataset(split)``, sharded over the DDP ranks (``DistributedSampler`` pads by
    repeating samples: de-duplicate the gathered rows by sample index). Defaults: the DataModule's eval batch
    size and workers."""
    dataset = dm.dataset(split)
    sampler = (DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=False)
               if is_distributed() else None)
    size = batch_size or getattr(dm, "eval_batch_size", None) or getattr(dm, "batch_size", 1)
    workers = num_workers if num_workers is not None else getattr(dm, "num_workers", 0)
    return DataLoader(dataset, batch_size=size, shuffle=False, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=False)


def _request_train_reload(trainer: Trainer) -> None:
    """Make the fit loop rebuild the train loader at the next epoch start (it caches it otherwise).

    Lightning 2.6 rebuilds in ``FitLoop.setup_data`` when it holds no loader, or every n epochs with
    ``reload_dataloaders_every_n_epochs``; dropping the cached loader is the only public-behaviour way to get a
    one-off rebuild. Every rank does this at the same point (setup_data runs collectives).
    """
    if trainer.reload_dataloaders_every_n_epochs == 1:
        return
    if not drop_cached_train_loader(trainer.fit_loop):  # private FitLoop state: see avmoe._private_api
        rank_zero_warn("ModalityValuation: cannot force a train-loader reload on this Lightning version; set "
                       "Trainer(reload_dataloaders_every_n_epochs=1) so the re-sampled plan is used")
