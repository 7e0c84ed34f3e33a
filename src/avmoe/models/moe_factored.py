"""The cross-modal experts' read of the mapped other modality without materialising it (``backbone.fast``).

In :class:`~avmoe.models.moe.MoEAdapter` the mapped tokens ``y = TokenMapping(other)`` (M, N, C) are read in
exactly two ways: the router takes their mean over tokens, and each cross-modal expert's latent tokens ``t0``
(T, C) summarise them, ``t = t0 + softmax_N(y t0^T)^T y`` (:meth:`~avmoe.models.moe.LatentTokens.summarise`).
Both are linear in ``y`` up to the softmax, and ``y`` itself is linear in ``other``:

    y_m = W u_m A^T + b r^T + 1 c^T,    r = A 1

with ``u_m`` (N', C') the other modality's tokens of frame m, ``W`` (N, N') and ``b`` (N,) the token mixing,
``A`` (C, C') and ``c`` (C,) its ``fc`` (both of :class:`~avmoe.models.moe.TokenMapping`'s orders are this map).
So, with ``G = t0 A`` (T, C'):

    scores  y_m t0^T       = W (u_m G^T) + b (t0 r)^T + 1 (t0 c)^T        (the last term is constant over N:
                                                                            the softmax over N drops it)
    summary att_m^T y_m    = (att_m^T W) u_m A^T + (att_m^T b) r^T + 1 c^T      (att's columns sum to 1)
    mean    mean_N y_m     = (mean_N W) u_m A^T + mean(b) r + c

The token mixing, the largest product of the adapter (N x N' per frame), then runs against 2T columns (scores,
summary) instead of ``min(C, C')`` (``y``): same parameters, same function, fewer FLOPs when ``2T < min(C, C')``
(the paper's AVE adapters at Swin stage 0: 2 x 32 vs 96; AVQA's 2 latents everywhere). All cross-modal experts
of a module share the products (their latent tokens stacked as columns).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe import CrossModalExpert, MoEAdapter, TokenMapping

MatMul = Callable[[Tensor, Tensor], Tensor]


def factoring_pays(module: MoEAdapter) -> bool:
    """True when the factored read costs fewer token-mixing FLOPs than materialising ``y``: 2T < min(C, C')."""
    latents = sum(e.fusion.tokens.shape[0] for e in module.experts if isinstance(e, CrossModalExpert))
    fc = module.token_map.fc
    return latents > 0 and 2 * latents < min(fc.in_features, fc.out_features)


def factored_reads(
    token_map: TokenMapping, latents: list[Tensor], other: Tensor, mm: MatMul = torch.mm
) -> tuple[Tensor, list[Tensor]]:
    """``(mean_N y (M, C), [t_e (M, T_e, C)])`` for ``y = token_map(other)`` and latent tokens ``latents[e]``
    (T_e, C), equal to ``(y.mean(1), [LatentTokens.summarise(y)])`` without ``y``. other: (M, N', C').
    ``mm``: the GEMM of the two N x N' token-mixing products (``torch.mm`` or ``backbones.gemm.mm``)."""
    w, b = token_map.token_weight, token_map.token_bias  # (N, N'), (N,)
    a, c = token_map.fc.weight, token_map.fc.bias  # (C, C'), (C,)
    m, n_src, _ = other.shape
    n = w.shape[0]
    r = a.sum(1)  # (C,): the token bias, broadcast over C' and widened by fc
    t0 = torch.cat(latents) if len(latents) > 1 else latents[0]  # (T, C)
    cols = t0.shape[0]
    v = torch.matmul(other, (t0 @ a).t())  # (M, N', T)
    # Token-major (N', M*T): the N x N' mixing is one GEMM for all frames; the copy is T wide, not C'.
    v = v.transpose(0, 1).reshape(n_src, m * cols)
    scores = mm(w, v).view(n, m, cols) + (b[:, None] * (t0 @ r))[:, None, :]  # (N, M, T)
    att = scores.softmax(dim=0)  # over the N mapped tokens, per frame and latent
    # att^T W for every frame and latent, plus one row of 1/N whose product is mean_N W (for the router):
    # ``w.mean(0)`` instead would materialise an N x N' gradient in its backward. The left operand is laid out
    # row-major (a copy M*T+1 wide): both GEMM libraries ran this product slower with a transposed one.
    lhs = torch.cat([att.view(n, m * cols).t(), att.new_full((1, n), 1.0 / n)], dim=0)  # (M*T + 1, N)
    prod = mm(lhs, w)  # (M*T + 1, N')
    mixed, w_mean = prod[:-1].view(m, cols, n_src), prod[-1]  # (M, T, N'), (N',)
    pooled = torch.bmm(mixed, other)  # (M, T, C')
    bias_read = torch.einsum("nmt,n->mt", att, b)  # (M, T): att^T b
    t = t0 + F.linear(pooled, a, c) + bias_read[..., None] * r  # (M, T, C)
    mean = F.linear(torch.matmul(w_mean, other), a, c) + b.mean() * r  # (M, C)
    return mean, list(t.split([x.shape[0] for x in latents], dim=1))
