"""Frozen Swin-V2 visual encoder (``transformers.Swinv2Model``), stepped stage by stage and half-block by half-block.

The library has no public entry point for "the attention half" of a ``Swinv2Layer``; :func:`attn_half` and
:func:`mlp_half` re-run ``Swinv2Layer.forward`` split in two using the layer's own submodules, so that
``mlp_half(layer, attn_half(layer, x, hw)) == layer(x, hw)[0]`` bit for bit (tests/test_backbone.py).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Swinv2Config, Swinv2Model

from avmoe._private_api import Swinv2Layer, Swinv2Stage, window_partition, window_reverse  # internals: see there

from ..config import VisualEncoderConfig
from .gemm import Linear, mlp
from .windows import FrozenCache, combine_mask, frozen, fused_qkv, mask_dtype, shifted_window_attention, tensor_key

Grid = tuple[int, int]


def swin_config(cfg: VisualEncoderConfig) -> Swinv2Config:
    """The ``Swinv2Config`` described by ``cfg`` (res-post-norm Swin-V2, no absolute position embedding)."""
    return Swinv2Config(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        embed_dim=cfg.embed_dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=cfg.window_size,
        pretrained_window_sizes=[0] * len(cfg.depths),
        drop_path_rate=cfg.drop_path_rate,
    )


def build_swin(cfg: VisualEncoderConfig) -> Swinv2Model:
    """Load ``cfg.pretrained`` (a local ``save_pretrained`` folder) or build a randomly initialised encoder."""
    if cfg.pretrained is not None:
        if not os.path.isdir(cfg.pretrained):  # else the hub reports "Repo id must be in the form ..."
            raise FileNotFoundError(f"backbone.visual.pretrained: folder {cfg.pretrained!r} does not exist (expected "
                                    "a local Swinv2Model.save_pretrained folder; nothing is downloaded)")
        model = Swinv2Model.from_pretrained(
            cfg.pretrained,
            local_files_only=True,
            dtype=torch.float32,
            add_pooling_layer=False,
            drop_path_rate=cfg.drop_path_rate,  # config override: only matters when train_mode is on
        )
        _warn_on_mismatch(model.config, cfg)
    else:
        warnings.warn(
            "VisualEncoderConfig.pretrained is None: the Swin-V2 visual encoder has RANDOM weights "
            "(fine for tests and demos, meaningless for real training).",
            stacklevel=2,
        )
        model = Swinv2Model(swin_config(cfg), add_pooling_layer=False)
    return model.float()


def _warn_on_mismatch(hf: Swinv2Config, cfg: VisualEncoderConfig) -> None:
    """The folder's config is the truth; say so loudly when the dataclass disagrees with it."""
    pairs = {
        "image_size": (hf.image_size, cfg.image_size),
        "patch_size": (hf.patch_size, cfg.patch_size),
        "embed_dim": (hf.embed_dim, cfg.embed_dim),
        "depths": (list(hf.depths), list(cfg.depths)),
        "num_heads": (list(hf.num_heads), list(cfg.num_heads)),
        "window_size": (hf.window_size, cfg.window_size),
    }
    diff = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if diff:
        warnings.warn(f"Swin-V2 folder config differs from VisualEncoderConfig (folder wins): {diff}", stacklevel=3)


def image_size(model: Swinv2Model) -> int:
    """Input resolution the encoder was built for (frames are resized to it)."""
    size = model.config.image_size
    return int(size if isinstance(size, int) else size[0])


def embed(model: Swinv2Model, pixels: Tensor) -> tuple[Tensor, Grid]:
    """Patch embedding + LayerNorm: (M, 3, H, W) -> tokens (M, N0, C0) and the grid (H0, W0)."""
    tokens, grid = model.embeddings(pixels)
    return tokens, (int(grid[0]), int(grid[1]))


def attn_half(layer: Swinv2Layer, x: Tensor, hw: Grid) -> Tensor:
    """First half of ``Swinv2Layer.forward``: ``x + drop_path(layernorm_before(WindowAttention(x)))``.

    x: (M, H*W, C). Same ops in the same order as the library (pad, roll, partition, mask, attention,
    reverse, roll back, crop), so the result is bit-identical.
    """
    height, width = hw
    m, _, channels = x.shape
    win, shift = layer.window_size, layer.shift_size
    h = x.view(m, height, width, channels)
    h, pad = layer.maybe_pad(h, height, width)  # (M, Hp, Wp, C)
    _, hp, wp, _ = h.shape
    if shift > 0:
        h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(h, win).view(-1, win * win, channels)  # (M*nW, w*w, C)
    mask = layer.get_attn_mask(hp, wp, dtype=h.dtype, device=windows.device)
    out = layer.attention(windows, mask)[0]  # (M*nW, w*w, C)
    out = window_reverse(out.view(-1, win, win, channels), win, hp, wp)  # (M, Hp, Wp, C)
    if shift > 0:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    if pad[3] > 0 or pad[5] > 0:
        out = out[:, :height, :width, :].contiguous()
    out = out.view(m, height * width, channels)
    return x + layer.drop_path(layer.layernorm_before(out))


def window_core(*args: Any) -> Tensor:
    """This encoder's own entry to :func:`shifted_window_attention` (a separate unit for regional compilation)."""
    return shifted_window_attention(*args)


def position_bias(layer: Swinv2Layer) -> Tensor:
    """Continuous position bias ``16 * sigmoid(cpb_mlp(coords_table))`` of one block: (heads, L, L), L = w*w."""
    attn = layer.attention.self
    heads, length = attn.num_attention_heads, attn.window_size[0] * attn.window_size[1]
    table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, heads)
    bias = table[attn.relative_position_index.view(-1)].view(length, length, heads).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias)


def attention_mask(layer: Swinv2Layer, padded: Grid, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive SDPA mask of one block on a padded grid: position bias + twice the library's shift mask.

    (The transformers Swin-V2 attention adds its -100 shift mask twice; folding both into the cached mask keeps
    the fast path equal to the library at no cost per step.)
    """
    shift_mask = layer.get_attn_mask(padded[0], padded[1], dtype=torch.float32, device=device)
    return combine_mask(position_bias(layer).float(), shift_mask, 2).to(dtype)


def attn_half_fast(layer: Swinv2Layer, x: Tensor, hw: Grid, cache: FrozenCache, core: Callable[..., Tensor] | None = None,
                   linear: Linear = F.linear) -> Tensor:
    """:func:`attn_half` through fused window attention; frozen constants (mask, fused q/k/v) from ``cache``.

    x: (M, H*W, C). Equal to :func:`attn_half` up to float rounding; trainable encoders rebuild the constants
    every call (with their graph). ``linear``: the GEMM of the q/k/v and output projections.
    """
    attn, win, shift = layer.attention.self, layer.window_size, layer.shift_size
    padded = (-(-hw[0] // win) * win, -(-hw[1] // win) * win)
    cpb = attn.continuous_position_bias_mlp

    dtype = mask_dtype(x)

    def build_mask() -> Tensor:
        return attention_mask(layer, padded, dtype, x.device)

    def build_qkv() -> tuple[Tensor, Tensor]:
        return fused_qkv(attn.query, attn.key, attn.value)

    if frozen(cpb):
        mask = cache.get(("swin-mask", id(layer), padded, *tensor_key(cpb[0].weight), dtype), build_mask)
    else:
        mask = build_mask()
    if frozen(attn.query, attn.key, attn.value):
        weight = cache.get(("swin-qkv-w", id(layer), *tensor_key(attn.query.weight)), lambda: build_qkv()[0])
        bias = cache.get(("swin-qkv-b", id(layer), *tensor_key(attn.query.weight)), lambda: build_qkv()[1])
    else:
        weight, bias = build_qkv()
    scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (heads, 1, 1), as the library
    dense = layer.attention.output.dense
    dropout_p = attn.dropout.p if attn.training else 0.0
    out = (core or window_core)(
        x, hw, win, shift, attn.num_attention_heads, weight, bias, mask, dense.weight, dense.bias,
        scale, 1.0, dropout_p, linear,
    )
    out = layer.attention.output.dropout(out)
    return x + layer.drop_path(layer.layernorm_before(out))


def mlp_half(layer: Swinv2Layer, x: Tensor, linear: Linear | None = None) -> Tensor:
    """Second half of ``Swinv2Layer.forward``: ``x + drop_path(layernorm_after(MLP(x)))``. x: (M, N, C).

    ``linear`` None: the library's MLP modules; else their two GEMMs through ``linear`` (:func:`mlp`).
    """
    hidden = layer.output(layer.intermediate(x)) if linear is None else mlp(layer, x, linear)
    return x + layer.drop_path(layer.layernorm_after(hidden))


def block(layer: Swinv2Layer, x: Tensor, hw: Grid) -> Tensor:
    """A whole Swin-V2 block through the library call (unpaired blocks). x: (M, N, C)."""
    return layer(x, hw)[0]


def downsample(stage: Swinv2Stage, x: Tensor, hw: Grid) -> tuple[Tensor, Grid]:
    """End-of-stage patch merging (if the stage has one): (M, H*W, C) -> (M, H/2*W/2, 2C)."""
    if stage.downsample is None:
        return x, hw
    return stage.downsample(x, hw), ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


def final_norm(model: Swinv2Model, x: Tensor) -> Tensor:
    """The encoder's last LayerNorm (applied after the last stage)."""
    return model.layernorm(x)


def stage_grids(model: Swinv2Model) -> list[Grid]:
    """Token grid (H_s, W_s) entering each stage, as the runtime downsampling produces it."""
    grid = tuple(int(g) for g in model.embeddings.patch_grid)
    grids = []
    for _ in model.encoder.layers:
        grids.append((grid[0], grid[1]))
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    return grids


def stage_dims(model: Swinv2Model) -> list[int]:
    """Token width of each stage."""
    return [int(stage.dim) for stage in model.encoder.layers]
