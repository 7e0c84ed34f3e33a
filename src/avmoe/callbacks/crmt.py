"""CRMT (ICLR 2024, "Quantifying and Enhancing Multi-modal Robustness with Modality Preference") as a callback.

Source: github.com/GeWu-Lab/Certifiable-Robust-Multi-modal-Training ``train.py``; the model pieces are
:mod:`avmoe.models.crmt`. Two ``fit`` runs driven from configs (``lightning_configs/callbacks/crmt_stage{1,2}.yaml``):

1. ``stage: 1`` (CRMT-JT; ``adversarial: true`` = CRMT-AT): the task loss plus the margin regulariser
   ``rho * mean log(sum_m sum_{k != y} exp(h^m_k - h^m_y) + 1e-5)`` (rho = 2.0). CRMT-AT first replaces the
   training inputs by ``generate_AT_sample``'s adversarial ones (5 steps of eps/5 on the log-mel and the normalised
   frames, joint L2-normalised gradient of the fused cross-entropy, clamped element-wise to +-2 eps, eps = 0.1).
2. ``stage: 2`` (``--run.init_from`` the stage-1 checkpoint): every parameter but the integration weights a^m is
   frozen; at the start the Lipschitz constants ``L[m, k] = max_x ||d fused_k / d x^m||`` are estimated on the
   training set (``get_lip``; max over ranks) and stored in the fusion's ``lipschitz`` buffer (so checkpoints carry
   them); the loss is replaced by minus the mean certified bound (``the_second_step``). The optimizer is the
   task's (``optim`` in the stage-2 config), not the official SGD(lr 0.03 lr, momentum 0.9, wd 1e-2).

At test time (any stage, once the constants exist) the certified lower bound of every clip with a class is
computed on the clean input: its mean is logged as ``test/crmt_bound`` (so it lands in the test's metrics JSON,
e.g. ``metrics/test_test.json``) and every clip's value is written to ``crmt_bound_<metrics file stem>.csv`` beside
that JSON (``metrics/crmt_bound_test_test.csv`` for a standalone ``test``, ``metrics/crmt_bound_test.csv`` after
fit; without a :class:`~avmoe.callbacks.metrics_json.MetricsJSON` writer ``<default_root_dir>/metrics/
crmt_bound_test.csv``): one row per clip with a class (``index``, ``video_id``, ``label``, ``prediction``,
``runner_up``, ``bound``), gathered over the DDP ranks once per sample index, sorted by index; the JSON names the
file under ``files.crmt_bound``. Under a robustness setting (``robustness.setting`` or a sweep row) nothing is
reported: the radius certifies the clean input.

Only tasks whose class prediction is a linear fusion of per-modality features qualify: AVE with ``crmt: true``
(the clip class from :class:`~avmoe.models.crmt.OrthogonalFusion`). The AVE CMBS head, AVVP's MGN / HAN heads, the
AVS decoder and AVQA's question-conditioned fusion are not linear fusions; the callback fails at setup (fit,
validate or test) with the reason (and ``crmt: true`` on those tasks fails at construction).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from avmoe.callbacks._distributed import all_reduce_max
from avmoe.datamodules.batch import INDEX, SKIPPED, batch_size
from avmoe.models.crmt import (CRMT_AT_EPS, CRMT_RHO, OrthogonalFusion, certified_bound, crmt_at_inputs,
                               lipschitz_constants, margin_loss, runner_up, stage2_loss)
from avmoe.robustness.setting import model_inputs
from avmoe.tasks.predictions import gather_records

BOUND_COLUMNS = ("index", "video_id", "label", "prediction", "runner_up", "bound")


def crmt_fusion(task: LightningModule) -> OrthogonalFusion:
    """The task's CRMT fusion layer, or a ValueError saying why the task does not qualify."""
    fusion = getattr(task, "crmt_fusion", None)
    if isinstance(fusion, OrthogonalFusion):
        return fusion
    name = type(task).__name__
    reason = getattr(task, "crmt_unsupported", None)  # the task's own account of its head
    hint = (f" {reason}" if reason else
            " Set model.init_args.crmt: true (the clip class from a CRMT orthogonal fusion of the pooled features)."
            if hasattr(task, "crmt_fusion") else
            " Its head is not a linear fusion of per-modality features (CRMT's certified bound needs one).")
    raise ValueError(f"CRMT needs a task whose prediction is a linear fusion of per-modality features; {name} has "
                     f"no CRMT fusion head.{hint}")


class CRMT(Callback):
    """CRMT training (stage 1: margin regulariser, optional CRMT-AT; stage 2: integration weights only) and the
    certified bound at test time.

    Args:
        stage: 1 or 2 (two fit runs; stage 2 starts from the stage-1 weights, ``--run.init_from``).
        rho: weight of the margin regulariser (2.0 as ``cfgs/methods/CRMT_*.yaml``).
        adversarial: CRMT-AT (stage 1): train on ``generate_AT_sample`` inputs.
        at_eps: CRMT-AT radius (0.1 as ``train.py``).
        at_steps: CRMT-AT steps (5, step eps / steps).
        lipschitz_batches: stage 2: training batches per rank for the Lipschitz estimate (None = all).
    """

    def __init__(self, stage: Literal[1, 2] = 1, rho: float = CRMT_RHO, adversarial: bool = False,
                 at_eps: float = CRMT_AT_EPS, at_steps: int = 5, lipschitz_batches: Optional[int] = None) -> None:
        if stage not in (1, 2):
            raise ValueError(f"CRMT stage must be 1 or 2, got {stage}")
        self.stage, self.rho, self.adversarial = stage, rho, adversarial
        self.at_eps, self.at_steps, self.lipschitz_batches = at_eps, at_steps, lipschitz_batches
        self._records: list[dict[str, Any]] = []

    # ---- fit ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        fusion = crmt_fusion(pl_module)  # every stage: a task without a CRMT fusion head fails here, with the reason
        if stage != "fit":
            return
        if self.stage == 2:  # before configure_optimizers: the optimizer then holds a^m only
            keep = {id(p) for p in fusion.a.parameters()}
            for p in pl_module.parameters():
                p.requires_grad_(id(p) in keep)
        pl_module.loss_hooks.append(self._loss_hook)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._loss_hook in getattr(pl_module, "loss_hooks", []):
            pl_module.loss_hooks.remove(self._loss_hook)

    def _loss_hook(self, task: Any, outputs: dict[str, Tensor], batch: dict[str, Any],
                   losses: dict[str, Tensor]) -> dict[str, Tensor]:
        fusion = task.crmt_fusion
        uni, fused, labels, _ = task.crmt_logits(outputs, batch)
        touch = sum(p.sum() for p in fusion.a.parameters()) * 0.0  # every rank's graph reaches a^m (DDP)
        if self.stage == 1:
            margin = margin_loss(uni, labels, self.rho) if len(labels) else touch
            return {**losses, "loss_crmt_margin": margin + touch}
        bound = (stage2_loss(uni, fused, labels, dict(fusion.a), fusion.fc.bias, fusion.lipschitz_dict())
                 if len(labels) else touch)
        return {"loss_crmt_bound": bound + touch}  # stage 2 trains a^m on the certified-bound objective alone

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fusion = crmt_fusion(pl_module)
        if self.stage == 2 and not bool(fusion.lipschitz.any()):  # a resumed stage 2 has them in its checkpoint
            fusion.lipschitz.copy_(all_reduce_max(self.estimate_lipschitz(trainer, pl_module)))

    @torch.no_grad()
    def estimate_lipschitz(self, trainer: Trainer, pl_module: Any) -> Tensor:
        """``get_lip`` on this rank's share of the training set: (modalities, C), model in eval mode."""
        fusion = pl_module.crmt_fusion
        lip = torch.zeros_like(fusion.lipschitz)
        was_training = pl_module.training
        pl_module.eval()
        try:
            for i, batch in enumerate(trainer.datamodule.train_dataloader()):
                if self.lipschitz_batches is not None and i >= self.lipschitz_batches:
                    break
                batch.pop(SKIPPED, None)
                if batch_size(batch) == 0:
                    continue
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                inputs, to_batch, _, _ = model_inputs(pl_module, batch)

                def fused_fn(x: dict[str, Tensor], to_batch: Any = to_batch) -> Tensor:
                    b = to_batch(x)
                    return pl_module.crmt_logits(pl_module(b)[1], b)[1]

                per_class = lipschitz_constants(fused_fn, inputs, lip.shape[1])
                for row, m in enumerate(fusion.modalities):
                    lip[row] = torch.maximum(lip[row], per_class[m].to(lip))
        finally:
            pl_module.train(was_training)
        return lip

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """CRMT-AT: the batch's audio and frames become adversarial (in place: training_step reads this dict)."""
        if not (self.adversarial and self.stage == 1) or batch_size(batch) == 0:
            return
        inputs, to_batch, _, _ = model_inputs(pl_module, batch)

        def loss_fn(x: dict[str, Tensor]) -> Tensor:
            b = to_batch(x)
            _, fused, labels, _ = pl_module.crmt_logits(pl_module(b)[1], b)
            return F.cross_entropy(fused.float(), labels) if len(labels) else fused.sum() * 0.0

        adv = crmt_at_inputs(loss_fn, inputs, eps=self.at_eps, steps=self.at_steps)
        batch.update(to_batch(adv))

    # ---- test: the certified bound ---------------------------------------------------------------------------
    @staticmethod
    def _reports(pl_module: Any) -> bool:
        """Whether this evaluation reports the bound: a CRMT fusion with Lipschitz constants, on clean input."""
        fusion = getattr(pl_module, "crmt_fusion", None)
        setting = getattr(pl_module, "eval_setting", None)
        return (isinstance(fusion, OrthogonalFusion) and bool(fusion.lipschitz.any())
                and (setting is None or setting.is_clean))

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._records = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if not self._reports(pl_module) or batch_size(batch) == 0:
            return
        self._records.extend(self.bound_records(pl_module, batch))

    @staticmethod
    @torch.no_grad()
    def bound_records(pl_module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One record per clip of ``batch`` with a class: its certified bound, fused prediction and runner-up."""
        fusion = pl_module.crmt_fusion
        _, out = pl_module(batch)
        uni, fused, labels, rows = pl_module.crmt_logits(out, batch)
        if not len(labels):
            return []
        bound = certified_bound(uni, fused, labels, dict(fusion.a), fusion.fc.bias, fusion.lipschitz_dict())
        second = runner_up(fused, labels)  # the class j the bound is taken against
        vids = batch.get("video_id")
        columns = zip(batch[INDEX][rows].tolist(), rows.tolist(), labels.tolist(), fused.argmax(dim=1).tolist(),
                      second.tolist(), bound.float().tolist())
        return [{"index": int(i), "video_id": None if vids is None else str(vids[r]), "label": int(y),
                 "prediction": int(p), "runner_up": int(j), "bound": float(b)} for i, r, y, p, j, b in columns]

    @staticmethod
    def bound_path(trainer: Trainer, split: str = "test") -> tuple[Path, Any]:
        """The per-sample file beside the split's metrics JSON, and that JSON's writer (or None)."""
        from avmoe.callbacks.metrics_json import MetricsJSON  # noqa: PLC0415

        writer = next((c for c in trainer.callbacks if isinstance(c, MetricsJSON)), None)
        if writer is None:
            return Path(trainer.default_root_dir) / "metrics" / f"crmt_bound_{split}.csv", None
        json_path = writer.path(split)
        return json_path.with_name(f"crmt_bound_{json_path.stem}.csv"), writer

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._reports(pl_module):
            return
        records = gather_records(self._records, trainer.world_size)  # every rank: a collective under DDP
        self._records = []
        mean = sum(r["bound"] for r in records) / max(len(records), 1)
        pl_module.log("test/crmt_bound", mean, sync_dist=False, rank_zero_only=False)  # identical on every rank
        path, writer = self.bound_path(trainer)
        if writer is not None:
            writer.attach_file("test", "crmt_bound", path.name)
        if trainer.is_global_zero:
            write_csv_atomic(path, records, BOUND_COLUMNS)


def write_csv_atomic(path: Path, records: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """CSV through a temporary file and ``os.replace`` (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)
