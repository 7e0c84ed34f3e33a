"""Shifted-window attention through ``F.scaled_dot_product_attention``, shared by the Swin-V2 and HTS-AT fast paths.

The library blocks (``Swinv2Layer``, ``ClapAudioLayer``) pad, roll, partition, project q/k/v with three GEMMs,
rebuild the position bias and the shift mask, and run ``matmul -> softmax -> matmul`` on every call. Here the
frozen constants (fused q/k/v weight, additive mask = position bias + shift mask) are built once by
:class:`FrozenCache`, and the window core is one fused GEMM, one permuting copy in, one fused attention kernel,
one permuting copy out. Linear maps commute with rolls and window partitions, so projecting after the roll gives
the library's result up to float rounding (``tests/test_fast_paths.py`` checks 1e-5 in fp32).
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm import Linear


class FrozenCache:
    """Tensors derived from frozen weights, computed once per key and reused.

    Callers only cache values whose source parameters do not require grad (see :func:`frozen`); keys carry the
    source tensor's storage pointer, dtype and device, so ``.to()``/dtype casts miss the old entries. In-place
    weight changes are not visible to a key: the backbone clears the cache after every ``load_state_dict``;
    call :meth:`clear` after editing frozen encoder weights in place by hand.
    """

    def __init__(self) -> None:
        self._store: dict[Hashable, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, key: Hashable, build: Callable[[], Tensor]) -> Tensor:
        value = self._store.get(key)
        if value is None:
            with torch.no_grad():
                value = build()
            self._store[key] = value
        return value


def frozen(*modules: nn.Module) -> bool:
    """True when no parameter of ``modules`` requires grad (their derived constants may then be cached)."""
    return not any(p.requires_grad for m in modules for p in m.parameters())


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's current storage, dtype and device (part of every cache key)."""
    return (t.data_ptr(), t.dtype, t.device)


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype q/k/v will have for input x: the autocast dtype inside autocast, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def fused_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether window attention on this device and q/k/v dtype runs through ``F.scaled_dot_product_attention``
    (see :func:`window_softmax_attention`)."""
    return device_type != "cpu" or dtype == torch.float32


def mask_dtype(x: Tensor) -> torch.dtype:
    """The dtype the cached additive mask needs for input x: q/k/v's for the fused kernel (it requires it), fp32
    for the explicit low-precision CPU path, which adds bias and mask to fp32 scores as the library does."""
    dtype = attention_dtype(x)
    return dtype if fused_kernel(x.device.type, dtype) else torch.float32


def fused_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear) -> tuple[Tensor, Optional[Tensor]]:
    """Stacked (3C, C) weight and (3C,) bias of three projections; a missing bias is zero (Swin-V2's key)."""
    weight = torch.cat([query.weight, key.weight, value.weight])
    biases = [m.bias for m in (query, key, value)]
    if all(b is None for b in biases):
        return weight, None
    ref = next(b for b in biases if b is not None)
    bias = torch.cat([b if b is not None else torch.zeros_like(ref) for b in biases])
    return weight, bias


def window_count(hw: tuple[int, int], win: int) -> tuple[int, int, int, int]:
    """Padded grid (Hp, Wp) and windows per axis (nH, nW) for ``win`` x ``win`` windows."""
    hp = -(-hw[0] // win) * win
    wp = -(-hw[1] // win) * win
    return hp, wp, hp // win, wp // win


def shifted_window_attention(
    x: Tensor,
    hw: tuple[int, int],
    win: int,
    shift: int,
    heads: int,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    mask: Tensor,
    out_weight: Tensor,
    out_bias: Optional[Tensor],
    q_scale: Optional[Tensor],
    sdpa_scale: float,
    dropout_p: float = 0.0,
    linear: Linear = F.linear,
) -> Tensor:
    """Window MSA of tokens x (M, H*W, C) on grid ``hw``, output projection included: -> (M, H*W, C).

    ``mask``: additive (1, nW*heads, L, L) with ``shift > 0``, else (1, heads, L, L); L = win*win (from
    :func:`combine_mask`).
    ``q_scale`` (heads, 1, 1): cosine attention (Swin-V2): q and k are L2-normalised and q is scaled per head;
    None: plain dot products scaled by ``sdpa_scale`` (Swin-V1 / HTS-AT).
    ``linear``: the GEMM of the two projections (``models/backbones/gemm.py`` for frozen weights).
    """
    m, _, c = x.shape
    h, w = hw
    hp, wp, nh, nw = window_count(hw, win)
    d, length = c // heads, win * win
    grid = x.view(m, h, w, c)
    if hp != h or wp != w:  # pad before projecting, as the library does (padded tokens project to the bias)
        grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h))
    if shift > 0:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    qkv = linear(grid, qkv_weight, qkv_bias)  # (M, Hp, Wp, 3C)
    qkv = qkv.view(m, nh, win, nw, win, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)  # (3, M, nh, nw, heads, win, win, d)
    qkv = qkv.reshape(3, m * nh * nw, heads, length, d)  # the one copy in
    q, k, v = qkv.unbind(0)  # (M*nW, heads, L, d)
    if q_scale is not None:  # (autocast may promote the norms to fp32: back to v's dtype for the kernel)
        q = (F.normalize(q, dim=-1) * q_scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
    if shift > 0:  # the mask differs per window: lay windows and heads out on one axis
        q, k, v = (t.view(m, nh * nw * heads, length, d) for t in (q, k, v))
    out = window_softmax_attention(q, k, v, mask, dropout_p, sdpa_scale)
    out = out.view(m, nh, nw, heads, win, win, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(m, hp, wp, c)  # copy out
    if shift > 0:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    if hp != h or wp != w:
        out = out[:, :h, :w, :]
    return linear(out.reshape(m, h * w, c), out_weight, out_bias)


def window_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float, scale: float) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` over windows: q, k, v (B, heads, L, d), mask (1, heads, L, L) -> (B, heads, L, d).

    fp32 (and every GPU dtype): ``F.scaled_dot_product_attention`` (fused kernel). bf16 / fp16 on a CPU: two
    low-precision GEMMs around fp32 scores (scale, bias + mask, softmax), the library's order of operations under
    autocast; torch's fused CPU kernel ran these short windows 2-11x slower than that in bf16, forward + backward
    at the paper's window shapes (L = 36-144, d = 32), while in fp32 it is the faster one (bench/BENCHMARKS.md,
    "Window attention kernel").
    """
    if fused_kernel(q.device.type, q.dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return gemm_attention(q, k, v, mask, dropout_p, scale)


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float, scale: float) -> Tensor:
    """The explicit path of :func:`window_softmax_attention`: GEMMs in q/k/v's dtype, scores in fp32."""
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale + mask  # (B, heads, L, L)
    att = scores.softmax(dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return torch.matmul(att.to(v.dtype), v)


def combine_mask(bias: Tensor, shift_mask: Optional[Tensor], shift_mask_times: int) -> Tensor:
    """Additive SDPA mask, (1, heads, L, L) or (1, nW*heads, L, L), from a (heads, L, L) position bias and an
    optional (nW, L, L) shift mask.

    ``shift_mask_times``: how often the library adds the shift mask (Swin-V2 in transformers adds it twice).
    The mask is 4-D because torch's CPU SDPA takes its fused (flash) kernel only for a 4-D ``attn_mask``; a 3-D
    one falls back to the unfused math path (explicit softmax and bmm), 1.3-3.9x slower forward + backward at
    the paper's window shapes (``tests/test_fast_paths.py`` pins the kernel choice).
    """
    if shift_mask is None:
        return bias.contiguous()[None]
    combined = bias[None] + shift_mask_times * shift_mask[:, None]  # (nW, heads, L, L)
    return combined.reshape(1, -1, *bias.shape[1:])
