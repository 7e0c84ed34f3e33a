"""The experts of one :class:`~avmoe.models.moe.MoEAdapter` with their shared work done once (``backbone.fast``).

The same parameters and the same function as :meth:`MoEAdapter.forward` (the reference, which runs the experts
one by one as yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` does); only the computation differs where the
shapes allow: experts whose bottleneck reads x itself (the ``linear`` unimodal experts: AVE, AVQA) share one
LayerNorm normalisation ``x_hat``, their LN_before affines are folded into the down projections,
``W (x_hat * g + b) = x_hat (W diag g)^T + W b``, and all of their down projections are one GEMM over ``x_hat``
with the stacked weights (autograd flows through the folding to the same parameters). Everything after the down
projection runs per expert as in the reference: BatchNorm (``use_bn``, AVE) keeps its per-expert statistics.
Where it takes fewer FLOPs, the mapped other modality is never materialised: the router and the cross-modal
experts read it in factored form (``models/moe_factored.py``).

Measured and left out (bench/BENCHMARKS.md, "MoE experts, module level"): stacking all experts for one ``bmm``
up-projection and one LN_post over the stacked (E, M*N, C) activations, with the LN_post affine folded into the
router weighting. On the CPU it was 0-20% slower than the experts one by one at paper-scale shapes (the stacked
temporaries are E times larger than any tensor of the reference, and the GEMMs are no faster batched).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import gemm
from .moe import CrossModalExpert, MoEAdapter, load_balance_loss
from .moe_factored import MatMul, factored_reads, factoring_pays


def batched_moe_forward(
    module: MoEAdapter, x: Tensor, other: Tensor, factor: Optional[bool] = None, onednn: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`MoEAdapter.forward` with the shared-input experts batched: ``(out (M, N, C), weights (M, E), lb)``.

    ``factor``: read the mapped other modality without materialising it (``models/moe_factored.py``); None =
    where that costs fewer FLOPs (:func:`~avmoe.models.moe_factored.factoring_pays`). ``onednn``: the factored
    read's token-mixing products through oneDNN where no gradient is wanted (``models/backbones/gemm.py``).
    """
    experts = list(module.experts)
    factor = factoring_pays(module) if factor is None else factor
    mean, y, summaries = _mapped(module, experts, other, factor, gemm.mm if onednn else torch.mm)
    weights = module.router.route(x.mean(1), mean)  # (M, E)
    down = _shared_down(experts, x)
    out: Optional[Tensor] = None
    for e, expert in enumerate(experts):
        b = expert.bottleneck
        if e in down:
            h = down[e]  # (M, N, C/r)
        else:  # y is None only where every expert that reads it has its summary
            h = b.down(b.ln_before(expert.fusion.read(x, summaries[e]) if e in summaries else expert.pre(x, y)))
        h = b._bn(b.bn_down, h)
        if b.activation:
            h = F.relu(h)
        h = b.ln_post(b._bn(b.bn_up, b.up(h)))  # (M, N, C)
        coef = weights[:, e] if expert.gate is None else weights[:, e] * expert.gate  # (M,)
        coef = coef[:, None, None]
        out = h * coef if out is None else torch.addcmul(out, h, coef)
    return out, weights, load_balance_loss(weights)  # type: ignore[return-value]


def _mapped(
    module: MoEAdapter, experts: list, other: Tensor, factor: bool, mm: MatMul
) -> tuple[Tensor, Optional[Tensor], dict]:
    """``(mean_N y (M, C), y (M, N, C) or None, {e: t_e (M, T, C)})`` for ``y = token_map(other)``: materialised,
    or (``factor``) read by the cross-modal experts' latent tokens through its factored form only."""
    cross = [e for e, expert in enumerate(experts) if isinstance(expert, CrossModalExpert)] if factor else []
    if not cross:
        y = module.token_map(other)
        return y.mean(1), y, {}
    mean, summaries = factored_reads(module.token_map, [experts[e].fusion.tokens for e in cross], other, mm)
    return mean, None, dict(zip(cross, summaries))


def _shared_down(experts: list, x: Tensor) -> dict[int, Tensor]:
    """expert index -> ``down(ln_before(x))`` (M, N, C/r) for every expert whose bottleneck reads x itself, from
    one LayerNorm of x and one GEMM (a column block of the product each)."""
    shared = [e for e, expert in enumerate(experts) if expert.reads_input]
    if not shared:
        return {}
    norms = [experts[e].bottleneck.ln_before for e in shared]
    downs = [experts[e].bottleneck.down.dense_weight() for e in shared]  # (h, C) each
    weight = torch.cat([w * ln.weight for w, ln in zip(downs, norms)])  # (k*h, C): LN scale folded in
    bias = torch.cat([w @ ln.bias for w, ln in zip(downs, norms)])  # (k*h,): LN shift folded in
    x_hat = F.layer_norm(x, x.shape[-1:], eps=norms[0].eps)  # every Bottleneck LayerNorm has the default eps
    return dict(zip(shared, F.linear(x_hat, weight, bias).chunk(len(shared), dim=-1)))
