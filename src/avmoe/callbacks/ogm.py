"""OGM-GE (CVPR 2022) and the journal OGM (TPAMI 2024): on-the-fly gradient modulation.

Sources: GeWu-Lab/OGM-GE_CVPR2022 ``main.py`` (``train_epoch``) and GeWu-Lab/BML_TPAMI2024 ``code/main.py`` (journal OGM).

Per optimizer step: the uni-modal scores ``s_u`` (batch sums of each modality's per-sample score from the task's
uni-modal predictions: the other modality's features zeroed before the head, or the auxiliary heads with
``model.unimodal.mode: aux``) give the discrepancy ratio ``rho_v = s_v / s_a`` and
``rho_a = 1 / rho_v``; the dominant modality's gradients are scaled by ``k = 1 - tanh(alpha * rho)`` and, for
OGM-GE, Gaussian noise with the per-tensor std of the *unmodulated* gradient is added to both modalities.

Where it acts (Lightning's hook order): the scores of each micro-batch are computed in
``on_after_backward`` from :attr:`AVTask.last_step` (``on_train_batch_end`` would be too late: it runs after the
optimizer step) and accumulated; ``on_before_optimizer_step`` all-reduces ``[s_a, s_v, n, non-finite]`` over the
DDP ranks and edits the accumulated, unscaled, already-averaged gradients once per optimizer step. The noise
comes from a generator seeded by ``(seed, global_step)`` and drawn in a fixed parameter order, so every rank adds
the same noise and the replicas stay identical (and a resumed run draws the same noise).

Official-code quirks (as read) and what is done here:

- The coefficient uses ``relu(rho)``, not ``relu(rho - 1)``, and is applied only when ``rho > 1``, so ``k`` jumps
  from 1 to ``1 - tanh(alpha)`` at ``rho = 1``; reproduced by default, ``smooth=True`` gives the continuous
  ``1 - tanh(alpha * relu(rho - 1))``.
- At an exact tie (``rho_v == 1``) the CVPR code's ``else`` branch modulates audio (``main.py``), the journal
  code (``BML_TPAMI2024 code/main.py``) visual; the paper's Eq. (10) (``k = 1`` unless ``rho > 1``) is followed
  here: nothing is scaled at a tie.
- Only 4-D (conv) gradients are modulated officially; here the parameters come from
  :meth:`AVTask.modality_parameters` (module ownership) and ``min_param_dim`` picks the tensors
  (default 2: weight matrices and convolutions, no biases / norm affines, as BalanceBenchmark). A setting that
  selects no tensor of a modality (``min_param_dim: 4`` on AVMoE, whose adapters and heads hold no 4-D tensor)
  is an error at fit start, never a silent no-op that still logs coefficients.
- Scores are computed with the head in eval mode on the detached features of the training forward (no dropout
  noise, no BatchNorm statistics updated by the probe); samples whose data-plan mask removed a modality are
  left out of the scores.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from avmoe.callbacks._distributed import all_reduce_sum, shared_generator
from avmoe.datamodules.batch import AUDIO_MASK, VISUAL_MASK

Number = Union[float, Tensor]
MODALITIES = ("audio", "visual")
CONTRACT = ("modality_parameters", "unimodal_outputs", "sample_scores", "head_forward", "feature_hooks")


def ogm_coefficients(score_audio: Number, score_visual: Number, alpha: float, smooth: bool = False) -> tuple[Any, Any]:
    """OGM modulation coefficients ``(k_audio, k_visual)`` from the two batch scores.

    The dominant modality (ratio ``rho > 1``) gets ``1 - tanh(alpha * rho)`` (official) or
    ``1 - tanh(alpha * relu(rho - 1))`` (``smooth``); the other gets 1. A tie gives ``(1, 1)``; a zero score
    makes the other modality's ratio infinite (``k = 0``); two zero scores give ``(1, 1)``.

    Args:
        score_audio: batch score of the audio modality (e.g. sum of true-class probabilities).
        score_visual: same for the visual modality.
        alpha: modulation strength.
        smooth: continuous variant without the jump at ``rho = 1``.

    Returns:
        Python floats for float inputs, 0-dim tensors when either score is a tensor.
    """
    as_tensor = isinstance(score_audio, Tensor) or isinstance(score_visual, Tensor)
    s_a, s_v = float(score_audio), float(score_visual)
    k_a = k_v = 1.0
    if s_a > s_v:
        k_a = _coefficient(s_a / s_v if s_v > 0 else math.inf, alpha, smooth)
    elif s_v > s_a:
        k_v = _coefficient(s_v / s_a if s_a > 0 else math.inf, alpha, smooth)
    if as_tensor:
        return torch.tensor(k_a, dtype=torch.float64), torch.tensor(k_v, dtype=torch.float64)
    return k_a, k_v


def _coefficient(rho: float, alpha: float, smooth: bool) -> float:
    x = max(rho - 1.0, 0.0) if smooth else max(rho, 0.0)
    return 1.0 - math.tanh(alpha * x)


def discrepancy_ratio(score_audio: float, score_visual: float) -> float:
    """``rho_v = s_v / s_a`` (official ``data/ratio v``); inf when ``s_a`` is 0, nan when both are."""
    if score_audio > 0:
        return score_visual / score_audio
    return math.nan if score_visual <= 0 else math.inf


class EpochWindow:
    """``start <= epoch <= end`` (both inclusive, official) and past the TPAMI warm-up (``epoch >= warmup``)."""

    def __init__(self, start_epoch: int, end_epoch: Optional[int], warmup_epochs: int) -> None:
        self.start, self.end, self.warmup = start_epoch, end_epoch, warmup_epochs

    def active(self, epoch: int) -> bool:
        return epoch >= max(self.start, self.warmup) and (self.end is None or epoch <= self.end)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for a probe, restoring every submodule's own flag (frozen encoders may stay in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def check_contract(pl_module: LightningModule, who: str) -> None:
    missing = [name for name in CONTRACT if not hasattr(pl_module, name)]
    if missing:
        raise TypeError(f"{who} needs a task module with the modality contract (avmoe.tasks.AVTask); "
                        f"{type(pl_module).__name__} lacks {', '.join(missing)}")


def modality_groups(pl_module: LightningModule, who: str) -> dict[str, list[nn.Parameter]]:
    """``modality_parameters()`` checked: both groups non-empty and disjoint."""
    groups = pl_module.modality_parameters()
    for modality in MODALITIES:
        if not groups.get(modality):
            raise ValueError(f"{who}: {type(pl_module).__name__}.modality_parameters() has no trainable "
                             f"{modality} parameters; nothing to modulate")
    shared = {id(p) for p in groups["audio"]} & {id(p) for p in groups["visual"]}
    if shared:
        raise ValueError(f"{who}: {len(shared)} parameter(s) are in both the audio and the visual group")
    return groups


def present_samples(batch: dict[str, Any], size: int, device: torch.device) -> Tensor:
    """(B,) bool: samples whose data plan keeps both modalities (uni-modal scores are meaningless otherwise)."""
    keep = torch.ones(size, dtype=torch.bool, device=device)
    for key in (AUDIO_MASK, VISUAL_MASK):
        mask = batch.get(key)
        if mask is not None:
            keep &= mask.to(device).reshape(-1) > 0
    return keep


def stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def unimodal_score_sums(trainer: Optional[Trainer], pl_module: LightningModule, feats: Any,
                        batch: dict[str, Any]) -> Tensor:
    """``[s_audio, s_visual, n]``: sums of the per-sample uni-modal scores over the samples with both modalities.

    The head runs in eval mode without grad on ``feats`` (any autograd history is ignored).
    """
    with torch.no_grad(), eval_mode(pl_module), _forward_context(trainer):
        outputs = pl_module.unimodal_outputs(feats, batch)
        scores = [pl_module.sample_scores(outputs[m], batch).detach().reshape(-1) for m in MODALITIES]
    device = scores[0].device
    keep = present_samples(batch, scores[0].numel(), device)
    dtype = stats_dtype(device)
    sums = [s.to(dtype)[keep].sum() for s in scores]
    return torch.stack([*sums, keep.sum().to(dtype)])


@contextmanager
def _forward_context(trainer: Optional[Trainer]) -> Iterator[None]:
    """The precision plugin's autocast (features recorded under bf16/fp16 autocast must meet the same dtypes)."""
    if trainer is None:
        yield
        return
    with trainer.precision_plugin.forward_context():
        yield


class OGMGE(Callback):
    """On-the-fly gradient modulation with optional generalization enhancement (GE noise).

    Works with every :class:`~avmoe.tasks.base.AVTask` (modality contract). Logs ``ogm/ratio_visual``
    (``s_v / s_a``), ``ogm/k_audio``, ``ogm/k_visual``, ``ogm/score_audio``, ``ogm/score_visual`` (mean
    per-sample scores), ``ogm/active`` every optimizer step and ``ogm/skipped_nonfinite`` when a step's
    gradients were not finite (then nothing is edited).

    Args:
        alpha: modulation strength (official: 0.1 VGGSound, 0.8 CREMA-D; TPAMI scripts 0.8 KS, 2.6 CREMA-D).
        noise: add GE noise ``N(0, std(g)^2)`` per tensor (OGM-GE); False is plain OGM.
        smooth: ``1 - tanh(alpha * relu(rho - 1))`` instead of the official jump at ``rho = 1``.
        start_epoch: first epoch with modulation (inclusive).
        end_epoch: last epoch with modulation (inclusive; official 50); None: to the end.
        warmup_epochs: TPAMI warm-up: no modulation before this epoch (the journal code: 6, i.e. epochs 0-5).
        min_param_dim: modulate only gradients with at least this many dimensions (4: conv only, official;
            2: weights, BalanceBenchmark; 1: every tensor of the modality groups). Selecting no tensor of a
            modality is an error at fit start.
        seed: seed of the GE noise (combined with the global step; identical on all ranks).

    At an exact tie of the scores (``rho = 1``) nothing is modulated (the paper's Eq. 10); the CVPR code
    modulates audio there and the journal code visual.
    """

    prefix = "ogm"

    def __init__(
        self,
        alpha: float = 0.1,
        noise: bool = True,
        smooth: bool = False,
        start_epoch: int = 0,
        end_epoch: Optional[int] = 50,
        warmup_epochs: int = 0,
        min_param_dim: int = 2,
        seed: int = 0,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.noise = noise
        self.smooth = smooth
        self.window = EpochWindow(start_epoch, end_epoch, warmup_epochs)
        self.min_param_dim = min_param_dim
        self.seed = seed
        self._pending: Optional[Tensor] = None  # [s_a, s_v, n] summed over the micro-batches of this window
        self._groups: dict[str, list[nn.Parameter]] = {}
        self.num_modulated = 0
        self.num_skipped_nonfinite = 0
        self.last: dict[str, float] = {}
        """What the latest optimizer step saw: ratio, coefficients, mean scores, active (1/0), skipped."""

    # ---- setup ----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        who = type(self).__name__
        check_contract(pl_module, who)
        self._groups = modality_groups(pl_module, who)
        for modality in MODALITIES:
            if not any(p.dim() >= self.min_param_dim for p in self._groups[modality]):
                dims = sorted({p.dim() for p in self._groups[modality]})
                raise ValueError(f"{who}(min_param_dim={self.min_param_dim}) selects no {modality} tensor of "
                                 f"{type(pl_module).__name__} (its {modality} parameters have {dims} dimensions), "
                                 f"so nothing would be modulated; lower min_param_dim (2: weight matrices)")
        pl_module.record_steps = True

    # ---- per micro-batch ------------------------------------------------------------------------------------
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is None or record.extras.get(self._tag()):
            return  # no forward since the last call (e.g. a skipped empty batch)
        record.extras[self._tag()] = True
        sums = unimodal_score_sums(trainer, pl_module, record.feats, record.batch)
        self._pending = sums if self._pending is None else self._pending + sums.to(self._pending.device)

    def _tag(self) -> str:
        return f"{self.prefix}_counted_{id(self)}"

    # ---- per optimizer step ---------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        active = self.window.active(trainer.current_epoch)
        grads = self._grads() if active else {m: [] for m in MODALITIES}
        device = pl_module.device
        dtype = stats_dtype(device)
        pending = self._pending if self._pending is not None else torch.zeros(3, dtype=dtype, device=device)
        self._pending = None
        nonfinite = torch.zeros(1, dtype=dtype, device=device)
        if active:
            flat = [g for gs in grads.values() for g in gs]
            if flat:
                nonfinite += (~torch.stack([torch.isfinite(g).all() for g in flat]).all()).to(dtype)
        # One collective per optimizer step on every rank, whatever happens next.
        s_a, s_v, n, bad = self._all_reduce(torch.cat([pending.to(device, dtype), nonfinite])).tolist()
        k_a, k_v = ogm_coefficients(s_a, s_v, self.alpha, self.smooth) if n > 0 else (1.0, 1.0)
        skipped = active and bad > 0
        applied = active and not skipped and n > 0
        if skipped:
            self.num_skipped_nonfinite += 1
            if self.num_skipped_nonfinite == 1:  # then counted in ogm/skipped_nonfinite, not warned every step
                rank_zero_warn(f"{type(self).__name__}: non-finite gradients at step {trainer.global_step}; "
                               "modulation skipped for this step (logged as ogm/skipped_nonfinite)",
                               category=RuntimeWarning)
        if applied:
            self._modulate(grads, {"audio": k_a, "visual": k_v}, trainer.global_step)
            self.num_modulated += 1
        self.last = {"ratio_visual": discrepancy_ratio(s_a, s_v), "k_audio": k_a if applied else 1.0,
                     "k_visual": k_v if applied else 1.0, "score_audio": s_a / n if n else math.nan,
                     "score_visual": s_v / n if n else math.nan, "active": float(applied),
                     "skipped_nonfinite": float(skipped)}
        self._log(pl_module)

    @staticmethod
    def _all_reduce(stats: Tensor) -> Tensor:
        """Sum over the DDP ranks (a seam: the DDP test overrides it to show that rank-local stats diverge)."""
        return all_reduce_sum(stats)

    def _grads(self) -> dict[str, list[Tensor]]:
        return {m: [p.grad for p in self._groups[m] if p.grad is not None and p.grad.dim() >= self.min_param_dim]
                for m in MODALITIES}

    @torch.no_grad()
    def _modulate(self, grads: dict[str, list[Tensor]], k: dict[str, float], step: int) -> None:
        generators: dict[torch.device, torch.Generator] = {}
        for modality in MODALITIES:  # fixed order: audio tensors first, then visual, each in contract order
            for g in grads[modality]:
                sigma = self._std(g) if self.noise else None  # of the unmodulated gradient (official, issue #5)
                if k[modality] != 1.0:
                    g.mul_(k[modality])
                if sigma is not None:
                    gen = generators.get(g.device)
                    if gen is None:
                        gen = generators[g.device] = shared_generator(g.device, self.seed, step)
                    noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=torch.float32)
                    g.add_(noise.mul_(sigma).to(g.dtype))

    @staticmethod
    def _std(g: Tensor) -> Tensor:
        # fp32 std as a tensor (no host sync per tensor); a 1-element tensor has no spread.
        std = g.float().std() if g.numel() > 1 else torch.zeros((), device=g.device)
        return std + 1e-8

    def _log(self, pl_module: LightningModule) -> None:
        for name, value in self.last.items():
            if not math.isnan(value) and not math.isinf(value):
                pl_module.log(f"{self.prefix}/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # ---- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pending": None if self._pending is None else self._pending.detach().cpu(),
                "num_modulated": self.num_modulated, "num_skipped_nonfinite": self.num_skipped_nonfinite,
                "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("pending")
        self.num_modulated = int(state_dict.get("num_modulated", 0))
        self.num_skipped_nonfinite = int(state_dict.get("num_skipped_nonfinite", 0))
        self.last = dict(state_dict.get("last", {}))


class OGM(OGMGE):
    """The journal (TPAMI 2024) OGM: 6 warm-up epochs, ``alpha`` 0.8, modulation up to epoch 60, GE noise.

    ``scripts/train_ogm.sh`` passes no ``--modulation``, so the journal script runs its default ``OGM_GE``
    (``code/main.py`` argparse, ``config.py``): GE noise on, as here; ``noise=False`` is the plain ``OGM`` mode.

    Args:
        alpha: modulation strength (``scripts/train_ogm.sh``: 0.8).
        noise: add GE noise (the journal script's default ``OGM_GE``); False: ``--modulation OGM``.
        smooth: continuous coefficient instead of the official jump at ``rho = 1``.
        start_epoch: first epoch with modulation (inclusive).
        end_epoch: last epoch with modulation (inclusive); None: to the end.
        warmup_epochs: no modulation before this epoch (journal code: ``warm_up = epoch <= 5``).
        min_param_dim: modulate only gradients with at least this many dimensions.
        seed: noise seed.
    """

    def __init__(
        self,
        alpha: float = 0.8,
        noise: bool = True,
        smooth: bool = False,
        start_epoch: int = 0,
        end_epoch: Optional[int] = 60,
        warmup_epochs: int = 6,
        min_param_dim: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(alpha=alpha, noise=noise, smooth=smooth, start_epoch=start_epoch, end_epoch=end_epoch,
                         warmup_epochs=warmup_epochs, min_param_dim=min_param_dim, seed=seed)
