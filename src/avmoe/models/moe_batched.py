"""All experts of one :class:`~avmoe.models.moe.MoEAdapter` in batched form (part of the ``backbone.fast`` path).

The same parameters and the same function as :meth:`MoEAdapter.forward` (the reference, which runs the experts
one by one as yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` does); only the computation differs:

- experts whose bottleneck reads x itself (the ``linear`` unimodal experts: AVE, AVQA) share one LayerNorm
  normalisation ``x_hat``; their LN_before affines are folded into the down projections,
  ``W (x_hat * g + b) = x_hat (W diag g)^T + W b``, and all of them are one GEMM over ``x_hat`` with the stacked
  weights (autograd flows through the folding to the same parameters);
- the up projections of all experts are one ``bmm`` over the stacked hidden activations (E, M*N, C/r);
- without BatchNorm, the LN_post normalisations are one kernel over the stacked (E, M*N, C) and their affines are
  folded into the router weighting: ``sum_e w_e (z_hat_e g_e + b_e) = sum_e (w_e g_e) z_hat_e + sum_e w_e b_e``.

BatchNorm (``use_bn``, AVE) keeps per-expert statistics: each expert's own BatchNorm modules run on that expert's
slice, exactly as in the plain path (same batch statistics, same running-statistics updates).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe import Bottleneck, MoEAdapter, load_balance_loss


def batched_moe_forward(module: MoEAdapter, x: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`MoEAdapter.forward` with batched experts: ``(out (M, N, C), router weights (M, E), lb scalar)``."""
    y = module.token_map(other)  # (M, N, C)
    weights = module.router(x, y)  # (M, E)
    experts = list(module.experts)
    coefs = torch.stack([weights[:, e] if ex.gate is None else weights[:, e] * ex.gate
                         for e, ex in enumerate(experts)])  # (E, M)
    bottlenecks: list[Bottleneck] = [ex.bottleneck for ex in experts]
    hidden = _hidden(experts, x, y)  # (E, M*N, h)
    up = torch.stack([b.up.dense_weight().t() for b in bottlenecks])  # (E, h, C)
    z = torch.bmm(hidden, up)  # (E, M*N, C)
    return _weighted_post(bottlenecks, z, coefs, x.shape), weights, load_balance_loss(weights)


def _hidden(experts: list, x: Tensor, y: Tensor) -> Tensor:
    """Every expert's bottleneck activations after down projection [+ BN] [+ ReLU], stacked: (E, M*N, h)."""
    m, n, c = x.shape
    hid: list[Optional[Tensor]] = [None] * len(experts)
    shared = [e for e, ex in enumerate(experts) if ex.reads_input]
    if shared:  # one LayerNorm of x, one GEMM for all of them (LN affine folded into the weights)
        norms = [experts[e].bottleneck.ln_before for e in shared]
        downs = [experts[e].bottleneck.down.dense_weight() for e in shared]  # (h, C) each
        weight = torch.cat([w * ln.weight for w, ln in zip(downs, norms)])  # (k*h, C)
        bias = torch.cat([w @ ln.bias for w, ln in zip(downs, norms)])  # (k*h,)
        x_hat = F.layer_norm(x, (c,), eps=norms[0].eps).view(m * n, c)  # every Bottleneck LN has the default eps
        for e, h in zip(shared, torch.addmm(bias, x_hat, weight.t()).chunk(len(shared), dim=1)):
            hid[e] = h  # (M*N, h), a column block of the shared product
    for e, ex in enumerate(experts):
        b = ex.bottleneck
        h = hid[e]
        if h is None:
            h = b.down(b.ln_before(ex.pre(x, y))).view(m * n, -1)  # (M*N, h)
        if b.bn_down is not None:
            h = b.bn_down(h)  # this expert's own statistics
        hid[e] = F.relu(h) if b.activation else h
    return torch.stack(hid)  # type: ignore[arg-type]


def _weighted_post(bottlenecks: list[Bottleneck], z: Tensor, coefs: Tensor, shape: torch.Size) -> Tensor:
    """``sum_e coefs_e * LN_post_e([BN_up_e] z_e)``: z (E, M*N, C), coefs (E, M) -> (M, N, C)."""
    m, n, c = shape
    if bottlenecks[0].bn_up is not None:  # per-expert BatchNorm: per-expert LN_post, weighting as the plain path
        out: Optional[Tensor] = None
        for b, z_e, coef in zip(bottlenecks, z.unbind(0), coefs.unbind(0)):
            h = b.ln_post(b.bn_up(z_e)).view(m, n, c)
            coef = coef[:, None, None]
            out = h * coef if out is None else torch.addcmul(out, h, coef)
        return out  # type: ignore[return-value]
    z_hat = F.layer_norm(z, (c,), eps=bottlenecks[0].ln_post.eps).view(len(bottlenecks), m, n, c)
    gamma = torch.stack([b.ln_post.weight for b in bottlenecks])  # (E, C)
    beta = torch.stack([b.ln_post.bias for b in bottlenecks])  # (E, C)
    scale = coefs[:, :, None] * gamma[:, None, :]  # (E, M, C)
    out = torch.addcmul((coefs.t() @ beta)[:, None, :], z_hat[0], scale[0][:, None, :])  # (M, N, C)
    for e in range(1, len(bottlenecks)):
        out = torch.addcmul(out, z_hat[e], scale[e][:, None, :])
    return out
