"""Diagnosing & Re-learning (ECCV 2024, "Diagnosing and Re-learning for Balanced Multimodal Learning").

Official code: ``GeWu-Lab/Diagnosing_Relearning_ECCV2024`` ``code/ours.py`` (``purity_score``, ``reinit_score``,
``reinit``, ``get_feature``, ``main``) and ``code/script/ours.sh``; paper: Wei, Li, Feng, Hu, ECCV 2024
(arXiv 2407.09705), Sec. 3.

1. At fit start, a snapshot of the initial weights of every modality-owned parameter
   (:meth:`AVTask.modality_parameters`; officially every parameter of ``audio_net`` / ``visual_net``), taken
   after the strategy has wrapped (and, under DDP, broadcast) the model, so it is identical on every rank.
2. At the end of every ``every_n_epochs``-th epoch (``epoch % R == 0 and epoch > 0``, at most ``max_times``
   times, official R 20 and 3 times), with the model in eval mode: the time-pooled uni-modal backbone features
   (``BackboneOutput.audio`` / ``.visual`` averaged over frames) of every train and validation sample, each rank
   its shard, gathered and de-duplicated by sample index.
3. Per modality and split: MinMaxScaler to (-1, 1), k-means with as many clusters as classes
   (``random_state`` = ``seed``, official 0), purity = share of samples in their cluster's majority class.
4. ``alpha_k = tanh(lam * |P_train^k - P_val^k|)`` (official ``move_lambda`` 3) and, for every parameter of
   modality k, ``theta = alpha_k * theta_init + (1 - alpha_k) * theta`` (:func:`soft_reinit_`). A modality whose
   features separate the training set much better than the validation set (it has learnt, or over-fitted)
   is pulled back toward its initialisation; one that learnt little is left alone.

Choices (the official behaviour is the default where there is one):

- Optimizer state: the official code keeps the moments (``param.data = ...``); ``optimizer_state: reset``
  drops the optimizer state of the re-initialised tensors (fresh moments; Adam's step count restarts).
- Class labels for the clustering: :func:`cluster_labels` (AVE: the clip's event class, AVVP: the first weak
  label, AVS S4: the category, AVQA: the answer; a task may define ``cluster_labels(batch)``). The number of
  clusters is the number of distinct training labels unless ``num_clusters`` is given, at most the number of
  samples of the split.
- k-means runs on rank 0 (scikit-learn, as official) and ``alpha`` is broadcast: ranks never disagree.
- Resume: the re-initialisation of epoch e runs after validation has written epoch e's checkpoint; a run
  resumed from such a checkpoint runs it in ``on_train_start`` (its weights are exactly those of the end of
  epoch e). The snapshot travels in the callback's checkpoint state.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from avmoe.callbacks._distributed import all_gather_rows, all_reduce_sum, dedup_by_index, mix_seed, rank
from avmoe.callbacks.ogm import MODALITIES, _forward_context, check_contract, eval_mode, modality_groups
from avmoe.callbacks.valuation import split_loader
from avmoe.datamodules.batch import INDEX, SKIPPED, batch_size

OptimizerState = Literal["keep", "reset"]
AVE_BACKGROUND = 28  # avmoe.datamodules.ave.BACKGROUND


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of samples whose label is their cluster's majority label (``ours.py`` ``purity_score``)."""
    labels, clusters = np.asarray(labels).reshape(-1), np.asarray(clusters).reshape(-1)
    if labels.size == 0:
        return math.nan
    _, label_ids = np.unique(labels, return_inverse=True)
    total = 0
    for cluster in np.unique(clusters):
        total += int(np.bincount(label_ids[clusters == cluster]).max())
    return total / labels.size


def kmeans_purity(features: Any, labels: Any, num_clusters: int, seed: int) -> float:
    """Purity of a k-means clustering of ``features`` (N, D) against ``labels`` (N,), as ``ours.py`` ``reinit_score``.

    MinMaxScaler to (-1, 1) per feature, then scikit-learn ``KMeans(n_clusters=num_clusters, random_state=seed)``
    (its default ``n_init`` for the installed version, as the official call), then :func:`purity`.
    ``num_clusters`` is capped at the number of samples.
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415  (imported on use: only the diagnosis needs it)
    from sklearn.preprocessing import MinMaxScaler  # noqa: PLC0415

    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"kmeans_purity: features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if len(x) == 0:
        return math.nan
    k = max(1, min(int(num_clusters), len(x)))
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    clusters = KMeans(n_clusters=k, random_state=seed).fit_predict(scaled)
    return purity(y, clusters)


def relearning_strength(purity_train: float, purity_val: float, lam: float) -> float:
    """Re-initialisation strength ``alpha = tanh(lam * |purity_train - purity_val|)`` in [0, 1)."""
    return math.tanh(lam * abs(purity_train - purity_val))


@torch.no_grad()
def soft_reinit_(current: Tensor, initial: Tensor, alpha: float) -> Tensor:
    """In place: ``current = alpha * initial + (1 - alpha) * current``; returns ``current``.

    The official ``reinit`` computes the same expression (in the parameter's dtype) and assigns it to
    ``param.data`` (a new tensor); here the parameter's own storage is overwritten, so optimizers, DDP buckets
    and views keep pointing at it. Same values, same order of operations.
    """
    initial = initial.to(device=current.device, dtype=current.dtype)
    current.copy_(alpha * initial + (1.0 - alpha) * current)
    return current


def cluster_labels(task: Any, batch: dict[str, Any]) -> Tensor:
    """(B,) int64 class labels of a batch for the purity diagnosis (see the module docstring)."""
    if hasattr(task, "cluster_labels"):
        return task.cluster_labels(batch).long().reshape(-1)
    if "answer" in batch:  # AVQA
        return batch["answer"].long().reshape(-1)
    if "labels" in batch:  # AVVP weak labels (B, C): the first labelled class
        return batch["labels"].float().argmax(-1).long()
    if "label" in batch:  # AVE (B, T) segment labels: the clip's event class, background if none
        label = batch["label"].long()
        events = torch.where(label == AVE_BACKGROUND, label.new_full((), -1), label)
        return torch.where((events >= 0).any(1), events.max(1).values, label.new_full((), AVE_BACKGROUND))
    categories = batch.get("category")
    if categories is not None and all(isinstance(c, str) and c for c in categories):  # AVS S4
        return torch.tensor([mix_seed(*c.encode()) for c in categories], dtype=torch.long)
    raise ValueError(f"Relearning needs class labels to measure purity; {type(task).__name__}'s batches carry none "
                     "of answer / labels / label / category (AVS MS3 has no category: define "
                     "cluster_labels(batch) on the task)")


class Relearning(Callback):
    """Diagnosing & Re-learning: soft re-initialisation of each modality by its train/val purity gap.

    Logs at each diagnosis ``relearning/purity_{train,val}_{audio,visual}``, ``relearning/alpha_{audio,visual}``
    and ``relearning/count``.

    Args:
        lam: ``lambda`` of ``alpha = tanh(lambda * gap)`` (official ``move_lambda`` 3).
        every_n_epochs: diagnose after epochs ``R, 2R, ...`` (0-based ``epoch % R == 0 and epoch > 0``; official
            20; BalanceBenchmark 15).
        max_times: at most this many re-initialisations (official 3; BalanceBenchmark 2).
        num_clusters: k-means clusters; None: the number of distinct training labels (official ``n_classes``).
        optimizer_state: ``keep`` the optimizer moments of re-initialised tensors (official) or ``reset`` them.
        val_split: the held-out split whose purity is compared with the training split's (official ``val``,
            carved from the training set; never use the test split here).
        batch_size: feature-pass batch size; None: the DataModule's eval batch size.
        num_workers: feature-pass workers; None: the DataModule's.
        seed: k-means ``random_state`` (official 0).
    """

    prefix = "relearning"

    def __init__(
        self,
        lam: float = 3.0,
        every_n_epochs: int = 20,
        max_times: int = 3,
        num_clusters: Optional[int] = None,
        optimizer_state: OptimizerState = "keep",
        val_split: str = "val",
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if optimizer_state not in ("keep", "reset"):
            raise ValueError(f"optimizer_state must be 'keep' or 'reset', got {optimizer_state!r}")
        self.lam = lam
        self.every_n_epochs = every_n_epochs
        self.max_times = max_times
        self.num_clusters = num_clusters
        self.optimizer_state = optimizer_state
        self.val_split = val_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.snapshot: Optional[dict[str, list[Tensor]]] = None  # CPU copies of the initial modality weights
        self._restored = False  # the snapshot came from a checkpoint (resume): keep it
        self.done_epochs: list[int] = []
        self.history: list[dict[str, float]] = []

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        who = type(self).__name__
        check_contract(pl_module, who)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            raise TypeError(f"{who} needs an AVDataModule (dataset('train') / dataset('{self.val_split}')); "
                            f"got {type(dm).__name__}")
        groups = modality_groups(pl_module, who)
        if not self._restored:  # a resumed run keeps the snapshot of the original start (checkpoint state)
            self.snapshot = {m: [p.detach().cpu().clone() for p in groups[m]] for m in MODALITIES}
        for m in MODALITIES:
            shapes = [tuple(p.shape) for p in groups[m]]
            if shapes != [tuple(t.shape) for t in self.snapshot[m]]:
                raise ValueError(f"{who}: the {m} snapshot in the checkpoint does not match the model's {m} group")

    def due(self, epoch: int) -> bool:
        return epoch > 0 and epoch % self.every_n_epochs == 0 and len(self.done_epochs) < self.max_times

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        previous = trainer.current_epoch - 1
        if self.due(previous) and previous not in self.done_epochs:
            self.relearn(trainer, pl_module, previous, log=False)  # resumed between validation and epoch end

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.due(epoch) and epoch not in self.done_epochs:
            self.relearn(trainer, pl_module, epoch, log=True)

    # ---- diagnosis and re-learning ------------------------------------------------------------------------
    def relearn(self, trainer: Trainer, pl_module: LightningModule, epoch: int, log: bool = True) -> dict[str, float]:
        feats = {split: self.features(trainer, pl_module, split) for split in ("train", self.val_split)}
        stats = torch.zeros(6, dtype=torch.float64)
        if rank() == 0:  # k-means once; alpha is broadcast (sum with zeros from the other ranks)
            labels = feats["train"]["label"]
            k = self.num_clusters or int(np.unique(labels).size)
            for i, m in enumerate(MODALITIES):
                p_train = kmeans_purity(feats["train"][m], labels, k, self.seed)
                p_val = kmeans_purity(feats[self.val_split][m], feats[self.val_split]["label"], k, self.seed)
                stats[3 * i: 3 * i + 3] = torch.tensor([p_train, p_val, relearning_strength(p_train, p_val, self.lam)])
        p_ta, p_va, a_a, p_tv, p_vv, a_v = all_reduce_sum(stats).tolist()
        alphas = {"audio": a_a, "visual": a_v}
        self.reinitialise(trainer, pl_module, alphas)
        self.done_epochs.append(epoch)
        record = {"epoch": float(epoch), "purity_train_audio": p_ta, "purity_val_audio": p_va, "alpha_audio": a_a,
                  "purity_train_visual": p_tv, "purity_val_visual": p_vv, "alpha_visual": a_v,
                  "count": float(len(self.done_epochs))}
        self.history.append(record)
        if log:
            for name, value in record.items():
                if name != "epoch" and math.isfinite(value):
                    pl_module.log(f"{self.prefix}/{name}", value, on_step=False, on_epoch=True, batch_size=1)
        return record

    @torch.no_grad()
    def features(self, trainer: Trainer, pl_module: LightningModule, split: str) -> dict[str, np.ndarray]:
        """Time-pooled uni-modal features and labels of every sample of ``split`` (gathered, by sample index)."""
        rows = []
        with eval_mode(pl_module):
            for batch in split_loader(trainer.datamodule, split, self.batch_size, self.num_workers):
                batch.pop(SKIPPED, None)
                if batch_size(batch) == 0:
                    continue
                batch = move_data_to_device(batch, pl_module.device)
                with _forward_context(trainer):
                    out = pl_module.encode(batch)
                cols = [batch[INDEX].double()[:, None], cluster_labels(pl_module, batch).double()[:, None].to(
                    pl_module.device), out.audio.float().mean(1).double(), out.visual.float().mean(1).double()]
                rows.append(torch.cat(cols, dim=1).cpu())  # (B, 2 + Ca + Cv)
        if not rows:
            raise RuntimeError(f"{type(self).__name__}: the {split} split gave no samples on rank {rank()}")
        d_a = out.audio.shape[-1]
        gathered = all_gather_rows(torch.cat(rows))
        index, values = dedup_by_index(gathered[:, 0].long(), gathered[:, 1:])
        return {"index": index.numpy(), "label": values[:, 0].long().numpy(),
                "audio": values[:, 1: 1 + d_a].float().numpy(), "visual": values[:, 1 + d_a:].float().numpy()}

    def reinitialise(self, trainer: Trainer, pl_module: LightningModule, alphas: dict[str, float]) -> None:
        groups = modality_groups(pl_module, type(self).__name__)
        for m in MODALITIES:
            if alphas[m] == 0.0:
                continue
            for p, init in zip(groups[m], self.snapshot[m]):
                soft_reinit_(p.data, init, alphas[m])
                if self.optimizer_state == "reset":
                    for optimizer in trainer.optimizers:
                        optimizer.state.pop(p, None)

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "done_epochs": list(self.done_epochs),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshot = state_dict.get("snapshot")
        self._restored = self.snapshot is not None
        self.done_epochs = [int(e) for e in state_dict.get("done_epochs", [])]
        self.history = [dict(h) for h in state_dict.get("history", [])]
