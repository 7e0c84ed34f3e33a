"""MMPareto (ICML 2024, "Boosting Multimodal Learning with Innocent Unimodal Assistance"): a gradient policy.

Official code: ``GeWu-Lab/MMPareto_ICML2024`` ``code/MMPareto.py`` (``train_epoch``) and
``code/min_norm_solvers.py``; paper: Wei & Hu, ICML 2024 (arXiv 2405.17730), Sec. 4.

Losses: the multimodal loss ``L_mm`` (every term of the task's training loss except the uni-modal ones) plus one
uni-modal loss per modality, ``L_a`` and ``L_v``: the auxiliary heads' losses with ``model.unimodal.mode: aux``
(the official separate ``head_audio`` / ``head_video``), otherwise the task's own losses on its uni-modal
outputs (the head with the other modality's features zeroed; ``split`` also halves the fusion bias), added to
the training loss with weight ``unimodal_weight``.

Per optimizer step, for each modality k over its modality-owned parameters (:meth:`AVTask.modality_parameters`;
the official "encoder" is every parameter whose name holds ``audio``/``visual`` and not ``head``):

1. ``g_mm`` and ``g_k``: gradients of ``L_mm`` and ``L_k``; ``cos_k`` over the whole group (all tensors flattened);
2. weights: ``(1/2, 1/2)`` if ``cos_k > 0``, else the two-vector min-norm (MGDA) point
   ``w_mm = (g_k.g_k - g_mm.g_k) / |g_mm - g_k|^2`` with the solver's edge cases 0.999 / 0.001;
3. per parameter tensor: ``new = 2 (w_mm g_mm + w_k g_k)`` and ``grad = gamma * max(|g_sum| / |new|, 1) * new``,
   ``g_sum`` being that tensor's gradient of the whole training loss (the official "magnitude enhancement").

Every other parameter (fusion, classifiers, cross-modal layers) gets the plain gradient of the whole loss.

How it runs in Lightning: the callback plugs itself into the module as its gradient policy
(``AVTask.gradient_policy``), so the module's ``backward`` hands it the loss and its named terms. It takes the
per-loss gradients with ``torch.autograd.grad`` on one retained graph (three backward passes, no re-forward),
all-reduces them over the DDP ranks (mean; DDP's own reducer is not used: no hook fires without ``.backward``),
writes the total into ``.grad`` (so the GradScaler's inf check, clipping and other callbacks see an ordinary
gradient) and keeps the per-loss gradients of the modality groups, summed over the micro-batches of an
accumulation window. The combination runs once per optimizer step in ``on_before_optimizer_step``, on the
accumulated, unscaled, rank-averaged gradients: every rank takes the same decision. A rank whose batch had no
usable sample (skipped clips, :meth:`AVTask.empty_step_loss`) contributes zero per-loss gradients to the same
all-reduce (the rank mean, as DDP's zero-weighted step) and combines with the others. With fp16 and a GradScaler
each loss is backpropagated multiplied by the current scale (no underflow) and the kept copies are unscaled.

Guards (the official repository has an open NaN issue, #5): cosines and weights are computed in float64 from
the Gram entries with zero norms handled, and a tensor whose combined gradient ``new`` is zero gets a zero
gradient instead of ``0 / 0``; a step whose gradients are not finite is left unchanged and counted.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from avmoe.callbacks._distributed import is_distributed, world_size
from avmoe.callbacks.ogm import MODALITIES, EpochWindow, check_contract, modality_groups

AUX_KEYS = {"audio": "loss_aux_audio", "visual": "loss_aux_visual"}
UNI_KEYS = {"audio": "loss_uni_audio", "visual": "loss_uni_visual"}


def _dot_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def pareto_weights(mm_mm: float, mm_u: float, u_u: float) -> tuple[float, float, float]:
    """``(w_mm, w_u, cos)`` from the Gram entries of the multimodal and uni-modal gradients.

    ``cos > 0``: equal weights; otherwise ``MinNormSolver._min_norm_element_from2`` (official). A zero gradient
    has cosine 0 (as ``F.cosine_similarity``), so it takes the min-norm branch and its edge cases, never a
    division by zero.
    """
    denom = math.sqrt(max(mm_mm, 0.0)) * math.sqrt(max(u_u, 0.0))
    cos = mm_u / denom if denom > 0 else 0.0
    if cos > 0:
        return 0.5, 0.5, cos
    if mm_u >= mm_mm:
        w = 0.999
    elif mm_u >= u_u:
        w = 0.001
    else:  # here mm_u < min(mm_mm, u_u), so |g_mm - g_u|^2 = mm_mm + u_u - 2 mm_u > 0
        w = -(mm_u - u_u) / (mm_mm + u_u - 2.0 * mm_u)
    return w, 1.0 - w, cos


def enhance(mm: Tensor, uni: Tensor, total: Tensor, w_mm: float, w_u: float, gamma: float) -> Tensor:
    """One tensor's MMPareto gradient: ``gamma * max(|total| / |new|, 1) * new``, ``new = 2 (w_mm mm + w_u uni)``.

    Computed in float32 (or the input's wider dtype); ``new == 0`` gives zeros (officially ``0/0 = NaN``).
    """
    dtype = torch.promote_types(mm.dtype, torch.float32)
    new = 2.0 * w_mm * mm.to(dtype) + 2.0 * w_u * uni.to(dtype)
    new_norm, total_norm = torch.linalg.vector_norm(new), torch.linalg.vector_norm(total.to(dtype))
    ratio = total_norm / new_norm.clamp(min=torch.finfo(dtype).tiny)
    scale = torch.where(new_norm > 0, ratio.clamp(min=1.0), torch.ones_like(ratio))
    return new * (gamma * scale)


def mmpareto_combine(multimodal_grad: Tensor, unimodal_grad: Tensor, gamma: float = 1.5) -> Tensor:
    """The MMPareto gradient of one parameter tensor from its multimodal and uni-modal loss gradients.

    The official rule with this tensor as the whole encoder: cosine of the two, equal weights or the min-norm
    weights on conflict, then magnitude enhancement against ``g_sum = multimodal_grad + unimodal_grad`` (what
    backpropagating ``L_mm + L_u`` gives this tensor). The callback computes the cosine and the weights over
    the whole modality group and enhances each tensor with :func:`enhance`.

    Returns a tensor of the input's shape and dtype; never NaN for finite inputs (zero gradients included).
    """
    dd = _dot_dtype(multimodal_grad.device)
    mm, uni = multimodal_grad.reshape(-1).to(dd), unimodal_grad.reshape(-1).to(dd)
    w_mm, w_u, _ = pareto_weights(float(mm @ mm), float(mm @ uni), float(uni @ uni))
    out = enhance(multimodal_grad, unimodal_grad, multimodal_grad + unimodal_grad, w_mm, w_u, gamma)
    return out.to(multimodal_grad.dtype)


class MMPareto(Callback):
    """MMPareto gradient integration of the multimodal and uni-modal losses (see the module docstring).

    Logs every optimizer step ``mmpareto/cos_audio``, ``cos_visual`` (cosine of the multimodal and the
    uni-modal gradient of each modality group), ``w_mm_audio``, ``w_mm_visual`` (weight of the multimodal
    gradient: 0.5 without conflict), ``active`` and ``skipped_nonfinite``; the uni-modal losses are logged by
    the task as ``train/loss_uni_*`` (or ``train/loss_aux_*``).

    Args:
        gamma: magnitude enhancement factor (official 1.5; BalanceBenchmark's ``alpha``).
        unimodal_weight: weight of the uni-modal losses this callback adds when the task has no auxiliary heads
            (official: 1, ``loss_mm + loss_a + loss_v``). With ``unimodal.mode: aux`` the task's
            ``aux_weight`` applies instead.
        start_epoch: first epoch with the Pareto integration (inclusive); before it the plain summed gradient.
        end_epoch: last epoch with it (inclusive); None: to the end.
    """

    prefix = "mmpareto"

    def __init__(self, gamma: float = 1.5, unimodal_weight: float = 1.0, start_epoch: int = 0,
                 end_epoch: Optional[int] = None) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.unimodal_weight = unimodal_weight
        self.window = EpochWindow(start_epoch, end_epoch, 0)
        self._trainer: Optional[Trainer] = None
        self._params: list[nn.Parameter] = []
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._slots: dict[str, list[int]] = {}  # per modality: positions of its tensors in self._params
        self._pending: Optional[dict[str, list[Tensor]]] = None  # per-loss grads summed over micro-batches
        self.num_combined = 0
        self.num_conflicts = {m: 0 for m in MODALITIES}
        self.num_skipped_nonfinite = 0
        self.last: dict[str, float] = {}

    # ---- registration ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        who = type(self).__name__
        check_contract(pl_module, who)
        if not hasattr(pl_module, "gradient_policy"):
            raise TypeError(f"{who} needs a task module with a pluggable gradient policy (avmoe.tasks.AVTask)")
        if pl_module.gradient_policy is not None and pl_module.gradient_policy is not self:
            raise ValueError(f"{who}: the module already has a gradient policy ({pl_module.gradient_policy!r})")
        if not pl_module.automatic_optimization:
            raise ValueError(f"{who} works with automatic optimization only")
        unimodal = getattr(pl_module, "unimodal", None)
        if unimodal is not None and unimodal.mode == "aux" and unimodal.detach:
            raise ValueError(f"{who}: model.unimodal.detach is true, so the auxiliary losses never reach the "
                             "modality parameters and there is nothing to integrate; set detach: false")
        self._groups = modality_groups(pl_module, who)
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        position = {id(p): i for i, p in enumerate(self._params)}
        self._slots = {m: [position[id(p)] for p in self._groups[m]] for m in MODALITIES}
        self._trainer = trainer
        self._pending = None
        pl_module.gradient_policy = self

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unregister(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unregister(pl_module)

    def _unregister(self, pl_module: LightningModule) -> None:
        if getattr(pl_module, "gradient_policy", None) is self:
            pl_module.gradient_policy = None

    # ---- the gradient policy ----------------------------------------------------------------------------------
    def training_losses(self, task: Any, feats: Any, outputs: dict[str, Tensor], batch: dict[str, Any],
                        losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the uni-modal losses unless the auxiliary heads already provide them."""
        if all(key in losses for key in AUX_KEYS.values()):
            return losses
        uni = task.unimodal_outputs(feats, batch)
        extra = {}
        for modality in MODALITIES:
            terms = task.compute_losses(uni[modality], batch)
            extra[UNI_KEYS[modality]] = self.unimodal_weight * torch.stack(list(terms.values())).sum()
        return {**losses, **extra}

    def backward(self, task: Any, loss: Tensor, terms: dict[str, Tensor]) -> None:
        if not terms:  # DDP, no usable sample on this rank (AVTask.empty_step_loss): zero per-loss gradients
            # into the same all-reduce as the other ranks (DDP's own reducer would run different collectives)
            self._accumulate([[None] * len(self._params) for _ in range(3)], self._loss_scale())
            return
        keys = AUX_KEYS if all(k in terms for k in AUX_KEYS.values()) else UNI_KEYS
        uni = {m: terms[keys[m]] for m in MODALITIES}
        mm_terms = [v for k, v in terms.items() if k not in keys.values()]
        multimodal = torch.stack([t.to(loss.dtype).reshape(()) for t in mm_terms]).sum()
        scale = self._loss_scale()
        factor = scale / self._trainer.accumulate_grad_batches if self._trainer is not None else 1.0
        if float(loss.detach()) == 0.0:  # zero-weighted loss (e.g. OPM's fully dropped batch): no gradient
            factor = 0.0
        grads = self._per_loss_grads([multimodal, uni["audio"], uni["visual"]], factor)
        self._accumulate(grads, scale)

    def _loss_scale(self) -> float:
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _per_loss_grads(self, losses: list[Tensor], factor: float) -> list[list[Optional[Tensor]]]:
        out = []
        for i, term in enumerate(losses):
            if not term.requires_grad:
                out.append([None] * len(self._params))
                continue
            grads = torch.autograd.grad(term * factor, self._params, retain_graph=i < len(losses) - 1,
                                        allow_unused=True)
            out.append(list(grads))
        return out

    def _accumulate(self, grads: list[list[Optional[Tensor]]], scale: float) -> None:
        """``.grad += total`` and keep (g_mm, g_own) of the modality groups, all rank-averaged."""
        g_mm, g_a, g_v = grads
        own = {"audio": g_a, "visual": g_v}

        def dense(g: Optional[Tensor], p: nn.Parameter) -> Tensor:
            return torch.zeros_like(p) if g is None else g

        touched = [any(g[i] is not None for g in grads) for i in range(len(self._params))]
        total = [dense(g_mm[i], p) + dense(g_a[i], p) + dense(g_v[i], p) for i, p in enumerate(self._params)]
        kept = {m: [(dense(g_mm[i], self._params[i]), dense(own[m][i], self._params[i])) for i in self._slots[m]]
                for m in MODALITIES}
        flat = [*total, *(t for m in MODALITIES for pair in kept[m] for t in pair)]
        flat = _all_reduce_mean(flat)
        total, rest = flat[: len(total)], flat[len(total):]
        distributed = is_distributed()
        for p, g, hit in zip(self._params, total, touched):
            if not (hit or distributed):
                continue  # no loss reached it: leave .grad None, as a plain backward does
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
        pending = self._pending or {f"{m}_{k}": [] for m in MODALITIES for k in ("mm", "uni")}
        fresh = not pending["audio_mm"]
        for m in MODALITIES:
            n = len(kept[m])
            chunk, rest = rest[: 2 * n], rest[2 * n:]
            for j in range(n):
                mm32, uni32 = (chunk[2 * j + k].float() / scale for k in (0, 1))  # unscaled copies, fp32
                if fresh:
                    pending[f"{m}_mm"].append(mm32)
                    pending[f"{m}_uni"].append(uni32)
                else:
                    pending[f"{m}_mm"][j].add_(mm32)
                    pending[f"{m}_uni"][j].add_(uni32)
        self._pending = pending

    # ---- once per optimizer step ------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pending, self._pending = self._pending, None
        active = pending is not None and self.window.active(trainer.current_epoch)
        self.last = {"active": 0.0, "skipped_nonfinite": 0.0}
        if active:
            tensors = [t for ts in pending.values() for t in ts] + [p.grad for p in self._params if p.grad is not None]
            finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
            if not finite:
                self.num_skipped_nonfinite += 1
                self.last["skipped_nonfinite"] = 1.0
                if self.num_skipped_nonfinite == 1:
                    rank_zero_warn(f"{type(self).__name__}: non-finite gradients at step {trainer.global_step}; "
                                   "left unchanged (logged as mmpareto/skipped_nonfinite)", category=RuntimeWarning)
            else:
                self._combine(pending)
                self.num_combined += 1
                self.last["active"] = 1.0
        self._log(pl_module)

    @torch.no_grad()
    def _combine(self, pending: dict[str, list[Tensor]]) -> None:
        for m in MODALITIES:
            mm_list, uni_list = pending[f"{m}_mm"], pending[f"{m}_uni"]
            dd = _dot_dtype(mm_list[0].device)
            mm = torch.cat([t.reshape(-1) for t in mm_list]).to(dd)
            uni = torch.cat([t.reshape(-1) for t in uni_list]).to(dd)
            gram = torch.stack([mm @ mm, mm @ uni, uni @ uni]).tolist()  # one host sync per modality
            w_mm, w_u, cos = pareto_weights(*gram)
            self.num_conflicts[m] += int(not cos > 0)
            for p, g_mm, g_u in zip(self._groups[m], mm_list, uni_list):
                if p.grad is None:
                    continue
                p.grad.copy_(enhance(g_mm, g_u, p.grad, w_mm, w_u, self.gamma).to(p.grad.dtype))
            self.last.update({f"cos_{m}": cos, f"w_mm_{m}": w_mm})

    def _log(self, pl_module: LightningModule) -> None:
        for name, value in self.last.items():
            if math.isfinite(value):
                pl_module.log(f"{self.prefix}/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # ---- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_combined": self.num_combined, "num_conflicts": dict(self.num_conflicts),
                "num_skipped_nonfinite": self.num_skipped_nonfinite, "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_combined = int(state_dict.get("num_combined", 0))
        self.num_conflicts = {m: int(v) for m, v in state_dict.get("num_conflicts", {}).items()} or \
            {m: 0 for m in MODALITIES}
        self.num_skipped_nonfinite = int(state_dict.get("num_skipped_nonfinite", 0))
        self.last = dict(state_dict.get("last", {}))


def _all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    """Rank average of a list of tensors through one flat buffer (NCCL: on the GPU; gloo: on the CPU)."""
    if not is_distributed() or not tensors:
        return tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = torch.cat([t.reshape(-1).to(device, dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset: offset + n].view_as(t).to(t.device, t.dtype))
        offset += n
    return out
