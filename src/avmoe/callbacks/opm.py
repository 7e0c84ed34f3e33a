"""OPM: on-the-fly prediction modulation (TPAMI 2024, "On-the-fly Modulation for Balanced Multimodal Learning"; GeWu-Lab/BML_TPAMI2024 ``code/models/Classifier.py``).

In every training forward, the dominant modality's features are dropped per sample with probability
``q_u = q_base * (1 + lam * tanh(relu(rho_u - 1)))`` (0 for the other modality, clipped to [0, 1]); the drop runs
with probability ``p_exe`` per batch, and the surviving features of both modalities are rescaled by
``1 / (1 - theta)`` with ``theta = sum_u d_u q_u / sum_u d_u`` (``d_u``: pooled feature width, the expected
fraction of dropped dimensions). It acts through :attr:`AVTask.feature_hooks`, i.e. on
:class:`~avmoe.models.outputs.BackboneOutput` after the per-sample data masks, in training only.

``rho`` comes from the same batch, as in the official code: the task's uni-modal predictions (eval mode, no grad;
the head with one modality zeroed, or the auxiliary heads with ``unimodal.mode: aux``) are scored and the score
sums are all-reduced over the DDP ranks inside the forward, so every rank uses the same ``q``. The ``p_exe`` draw uses a generator shared by all ranks; the per-sample masks use a per-rank one
(keys: seed, rank, call counter, which is checkpointed so a resumed run draws the same masks).

Official-code behaviour changed on purpose:

- The official code removes samples whose modalities are all dropped and ``continue`` s past a batch with none
  left; under DDP that rank would miss the gradient all-reduce and the others would hang. Here no batch is ever
  skipped: with ``keep_one_modality`` (default) the dominant modality is not dropped on a sample whose other
  modality the data plan already removed, so no sample loses everything; without it, a batch in which every
  sample lost both modalities still runs backward with its loss multiplied by 0 (``on_before_backward``). A
  partially dropped batch keeps its fully dropped samples with all-zero features in the task loss (per-sample
  loss weights would need the task's ``compute_losses`` to take weights); the auxiliary heads' losses
  (``unimodal.mode: aux``) do leave out the samples whose modality was dropped.

Official quirk, off by default (``official_theta_grad``): the rescaling function of ``code/models/Classifier.py``
(``custom_autograd.backward``) returns ``theta`` itself as the gradient of ``theta``, and ``theta`` is computed
with grad from the uni-modal scores (the head's weights detached, the features not), so every dropping batch
sends an extra ``theta * d(theta)/d(features)`` into the encoders. With the option on, that term is added to the
gradient of the features entering the hook (computed from this rank's scores; ``theta`` from
:func:`opm_theta`). Off, the rescaling is a constant, as the paper describes it.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from avmoe.callbacks._distributed import all_reduce_sum, rank, shared_generator
from avmoe.callbacks.ogm import (
    EpochWindow,
    _forward_context,
    check_contract,
    discrepancy_ratio,
    eval_mode,
    present_samples,
    unimodal_score_sums,
)
from avmoe.datamodules.batch import AUDIO_MASK, VISUAL_MASK


def opm_drop_probabilities(score_audio: float, score_visual: float, q_base: float, lam: float) -> tuple[float, float]:
    """``(q_audio, q_visual)``: ``q_base * (1 + lam * tanh(relu(rho - 1)))`` for the dominant modality, else 0.

    ``rho_audio = s_a / s_v``, ``rho_visual = s_v / s_a``; a zero denominator makes the ratio infinite. Clipped to
    [0, 1]. Official ``calcu_q``: q is 0 unless ``tanh(relu(rho - 1)) > 0``, i.e. only for ``rho > 1``.
    """
    out = []
    for own, other in ((score_audio, score_visual), (score_visual, score_audio)):
        rho = own / other if other > 0 else (math.inf if own > 0 else 0.0)
        t = math.tanh(max(rho - 1.0, 0.0))
        out.append(min(max(q_base * (1.0 + lam * t), 0.0), 1.0) if t > 0 else 0.0)
    return out[0], out[1]


def opm_theta(score_audio: Tensor, score_visual: Tensor, q_base: float, lam: float, dim_audio: int,
              dim_visual: int) -> Tensor:
    """Differentiable ``theta = (d_a q_a + d_v q_v) / (d_a + d_v)`` from the two score sums (official ``calcu_q``
    then ``execute_drop``; ``q`` as :func:`opm_drop_probabilities`)."""
    qs = []
    for own, other in ((score_audio, score_visual), (score_visual, score_audio)):
        t = torch.tanh(torch.relu(own / other - 1.0))
        qs.append(torch.where(t > 0, q_base * (1.0 + lam * t), torch.zeros_like(t)).clamp(0.0, 1.0))
    return (dim_audio * qs[0] + dim_visual * qs[1]) / (dim_audio + dim_visual)


class OPM(Callback):
    """Drop the dominant modality's features per sample during training (forward-time balancing).

    Logs per training batch ``opm/ratio_visual`` (``s_v / s_a``), ``opm/q_audio``, ``opm/q_visual``,
    ``opm/executed`` (1 when the drop ran), ``opm/dropped_audio`` and ``opm/dropped_visual`` (fraction of samples).

    Args:
        q_base: base drop probability (``scripts/train_opm.sh`` 0.5; ``config.py`` and BalanceBenchmark 0.4).
        lam: growth with the ratio (the paper's lambda; BalanceBenchmark's ``alpha``), official 0.5.
        p_exe: probability that the drop runs on a given batch (official 0.7).
        start_epoch: first epoch with dropping (inclusive).
        end_epoch: last epoch with dropping (inclusive); None: to the end (BalanceBenchmark: 80).
        warmup_epochs: TPAMI warm-up: no dropping before this epoch (journal code ``warm_up = epoch <= 5``: 6).
        keep_one_modality: never drop the dominant modality of a sample whose other modality is already absent.
        official_theta_grad: reproduce the official extra gradient ``theta * d(theta)/d(features)`` on dropping
            batches (see the module docstring; an official quirk, off by default).
        seed: seed of the execution draw and of the masks.
    """

    prefix = "opm"

    def __init__(
        self,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        warmup_epochs: int = 6,
        keep_one_modality: bool = True,
        official_theta_grad: bool = False,
        seed: int = 0,
    ) -> None:
        for name, value in (("q_base", q_base), ("p_exe", p_exe)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.q_base = q_base
        self.lam = lam
        self.p_exe = p_exe
        self.window = EpochWindow(start_epoch, end_epoch, warmup_epochs)
        self.keep_one_modality = keep_one_modality
        self.official_theta_grad = official_theta_grad
        self.seed = seed
        self.num_calls = 0
        self.num_executed = 0
        self.num_zero_weighted = 0
        self._zero_weight_next_backward = False
        self._trainer: Optional[Trainer] = None
        self.last: dict[str, float] = {}

    # ---- registration ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_contract(pl_module, type(self).__name__)
        self._trainer = trainer
        if self._hook not in pl_module.feature_hooks:
            pl_module.feature_hooks.append(self._hook)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unregister(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unregister(pl_module)

    def _unregister(self, pl_module: LightningModule) -> None:
        hooks = getattr(pl_module, "feature_hooks", [])
        if self._hook in hooks:
            hooks.remove(self._hook)

    # ---- the feature hook -----------------------------------------------------------------------------------
    def _hook(self, task: LightningModule, feats: Any, batch: dict[str, Any]) -> Any:
        trainer = self._trainer
        if not task.training or trainer is None or not self.window.active(trainer.current_epoch):
            return feats
        sums = unimodal_score_sums(trainer, task, feats.detach(), batch)
        s_a, s_v, n = all_reduce_sum(sums).tolist()  # every rank runs this forward: a safe collective
        q_a, q_v = opm_drop_probabilities(s_a, s_v, self.q_base, self.lam) if n > 0 else (0.0, 0.0)
        call = self.num_calls
        self.num_calls += 1
        shared = shared_generator("cpu", self.seed, call)
        execute = bool(torch.rand((), generator=shared) < self.p_exe) and (q_a > 0 or q_v > 0)
        size = feats.batch_size
        keep_a, keep_v = torch.ones(size), torch.ones(size)
        if execute:
            keep_a, keep_v = self._masks(size, q_a, q_v, batch, call)
            self.num_executed += 1
        self._check_all_dropped(keep_a, keep_v, batch)
        self.last = {"ratio_visual": discrepancy_ratio(s_a, s_v), "q_audio": q_a, "q_visual": q_v,
                     "executed": float(execute), "dropped_audio": float(1 - keep_a.mean()),
                     "dropped_visual": float(1 - keep_v.mean())}
        self._log(task, size)
        if not execute:
            return feats
        scale = self._rescale(feats, q_a, q_v)
        if self.official_theta_grad and torch.is_grad_enabled():
            self._add_theta_gradient(trainer, task, feats, batch)
        device = feats.visual.device
        return feats.with_modality_scale(audio=(keep_a * scale).to(device), visual=(keep_v * scale).to(device))

    def _add_theta_gradient(self, trainer: Trainer, task: LightningModule, feats: Any, batch: dict[str, Any]) -> None:
        """Hooks adding ``theta * d(theta)/d(f)`` to the gradient of each feature tensor ``f`` of ``feats``."""
        names = [f.name for f in fields(feats) if isinstance(getattr(feats, f.name), Tensor)
                 and getattr(feats, f.name).requires_grad and getattr(feats, f.name).is_floating_point()]
        leaves = {n: getattr(feats, n).detach().requires_grad_() for n in names}
        with torch.enable_grad(), eval_mode(task), _forward_context(trainer):
            outputs = task.unimodal_outputs(replace(feats, **leaves), batch)
            keep = present_samples(batch, feats.batch_size, feats.visual.device)
            s_a, s_v = (task.sample_scores(outputs[m], batch).float().reshape(-1)[keep].sum()
                        for m in ("audio", "visual"))
            theta = opm_theta(s_a, s_v, self.q_base, self.lam, feats.audio.shape[-1], feats.visual.shape[-1])
        if not theta.requires_grad:
            return
        extra = torch.autograd.grad(theta, list(leaves.values()), grad_outputs=theta.detach(), allow_unused=True)
        for name, g in zip(names, extra):
            if g is not None:
                getattr(feats, name).register_hook(lambda grad, g=g: grad + g.to(grad.dtype))

    def _masks(self, size: int, q_a: float, q_v: float, batch: dict[str, Any], call: int) -> tuple[Tensor, Tensor]:
        gen = shared_generator("cpu", self.seed, call, rank() + 1)  # per rank: different samples
        keep_a = (torch.rand(size, generator=gen) >= q_a).float()
        keep_v = (torch.rand(size, generator=gen) >= q_v).float()
        if self.keep_one_modality:
            has_a, has_v = _plan_mask(batch, AUDIO_MASK, size), _plan_mask(batch, VISUAL_MASK, size)
            keep_a = torch.where(has_v > 0, keep_a, torch.ones_like(keep_a))  # visual absent: keep audio
            keep_v = torch.where(has_a > 0, keep_v, torch.ones_like(keep_v))
        return keep_a, keep_v

    @staticmethod
    def _rescale(feats: Any, q_a: float, q_v: float) -> float:
        # theta: expected fraction of dropped feature dimensions (fp32/fp64 on the host, never in half precision).
        d_a, d_v = feats.audio.shape[-1], feats.visual.shape[-1]
        theta = (d_a * q_a + d_v * q_v) / (d_a + d_v)
        return 1.0 / (1.0 - theta) if theta < 1.0 else 1.0

    def _check_all_dropped(self, keep_a: Tensor, keep_v: Tensor, batch: dict[str, Any]) -> None:
        size = keep_a.numel()
        alive = (keep_a * _plan_mask(batch, AUDIO_MASK, size) + keep_v * _plan_mask(batch, VISUAL_MASK, size)) > 0
        self._zero_weight_next_backward = size > 0 and not bool(alive.any())

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._zero_weight_next_backward:
            # Every sample lost both modalities: still backward (DDP all-reduce on every rank), with zero weight.
            loss.mul_(0.0)
            self.num_zero_weighted += 1
        self._zero_weight_next_backward = False

    def _log(self, task: LightningModule, size: int) -> None:
        for name, value in self.last.items():
            if not math.isnan(value) and not math.isinf(value):
                task.log(f"{self.prefix}/{name}", value, on_step=True, on_epoch=False, batch_size=size)

    # ---- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_calls": self.num_calls, "num_executed": self.num_executed,
                "num_zero_weighted": self.num_zero_weighted, "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_calls = int(state_dict.get("num_calls", 0))
        self.num_executed = int(state_dict.get("num_executed", 0))
        self.num_zero_weighted = int(state_dict.get("num_zero_weighted", 0))
        self.last = dict(state_dict.get("last", {}))


def _plan_mask(batch: dict[str, Any], key: str, size: int) -> Tensor:
    mask = batch.get(key)
    return torch.ones(size) if mask is None else mask.detach().float().reshape(-1).cpu()
