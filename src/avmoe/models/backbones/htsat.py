"""Frozen HTS-AT audio encoder: the audio tower of ``transformers.ClapAudioModel``, stepped stage by stage.

HTS-AT blocks run atomically (the official AVMoE code never splits them). ``ClapAudioLayer.forward`` mutates its
``window_size``/``shift_size`` when the grid is not larger than the window (transformers ``ClapAudioLayer.set_shift_and_window_size``); calling
the layer exactly as ``ClapAudioStage`` does (``blk(x, hw)``, ``always_partition=False``) keeps the stepped
path identical to the library forward.

In train mode (``AudioEncoderConfig.train_mode: true``) the encoder behaves as the official HTS-AT
(``AVMOE/AVE/nets/htsat.py``, ``drop_rate=0``, ``drop_path_rate=0.1``, called from ``AVMOE/AVE/nets/net_trans_v3.py``
``forward_swin``): SpecAugment after the mel BatchNorm (:class:`SpecAugment`), stochastic depth on *both* residual
branches of every block (the library layer has it on the attention branch only and a dropout of
``hidden_dropout_prob`` on the MLP output instead, which :func:`official_residual_drop_path` replaces) and BatchNorm
statistics updates. In eval mode all of these are inactive.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ClapAudioConfig, ClapAudioModel, ClapModel

from avmoe._private_api import ClapAudioLayer, ClapAudioStage  # transformers internals: see there

from ..config import AudioEncoderConfig
from .gemm import Linear, mlp
from .windows import FrozenCache, combine_mask, frozen, fused_qkv, mask_dtype, shifted_window_attention, tensor_key

Grid = tuple[int, int]


def clap_audio_config(cfg: AudioEncoderConfig) -> ClapAudioConfig:
    """The ``ClapAudioConfig`` of an HTS-AT tower described by ``cfg`` (unfused, no projection used)."""
    final_width = cfg.hidden_size * 2 ** (len(cfg.depths) - 1)
    return ClapAudioConfig(
        patch_embeds_hidden_size=cfg.hidden_size,
        hidden_size=final_width,  # 768 at paper scale; only used by CLAP's projection and its init scale
        depths=list(cfg.depths),
        num_attention_heads=list(cfg.num_heads),
        window_size=cfg.window_size,
        spec_size=cfg.spec_size,
        num_mel_bins=cfg.num_mel_bins,
        patch_size=cfg.patch_size,
        patch_stride=[cfg.patch_size, cfg.patch_size],
        enable_fusion=False,
        drop_path_rate=cfg.drop_path_rate,
    )


def build_htsat(cfg: AudioEncoderConfig) -> ClapAudioModel:
    """Load the audio tower from a local folder or an original HTS-AT checkpoint, else build it randomly."""
    if cfg.pretrained is not None and cfg.htsat_checkpoint is not None:
        raise ValueError("Set only one of AudioEncoderConfig.pretrained and AudioEncoderConfig.htsat_checkpoint.")
    if cfg.pretrained is not None:
        model = _load_folder(cfg.pretrained, cfg.drop_path_rate)
        _warn_on_mismatch(model.config, cfg)
    elif cfg.htsat_checkpoint is not None:
        from .convert_htsat import load_htsat_checkpoint  # local import: keeps the converter optional

        model = ClapAudioModel(clap_audio_config(cfg))
        load_htsat_checkpoint(cfg.htsat_checkpoint, model, trust=cfg.trust_checkpoint)
    else:
        warnings.warn(
            "AudioEncoderConfig.pretrained and .htsat_checkpoint are None: the HTS-AT audio encoder has RANDOM "
            "weights (fine for tests and demos, meaningless for real training).",
            stacklevel=2,
        )
        model = ClapAudioModel(clap_audio_config(cfg))
    official_residual_drop_path(model)
    if cfg.spec_augment:
        model.spec_augment = SpecAugment()  # no tensors: the state dict is unchanged
    return model.float()


def official_residual_drop_path(model: ClapAudioModel) -> None:
    """Stochastic depth on the MLP branch too, at the block's own rate, instead of the MLP-output dropout.

    ``ClapAudioLayer`` adds ``self.output(mlp)`` to the residual without drop-path; ``self.output.dropout`` sits on
    exactly that branch, so replacing it by the block's ``drop_path`` gives ``x + DropPath(MLP(LN(x)))`` as in the
    official ``SwinTransformerBlock`` (``AVMOE/AVE/nets/htsat.py``), whose MLP dropout is 0.
    """
    for stage in model.audio_encoder.layers:
        for layer in stage.blocks:
            layer.output.dropout = copy.deepcopy(layer.drop_path)


class SpecAugment(nn.Module):
    """Training-time SpecAugment of the official HTS-AT: zero random stripes of a (M, 1, frames, mels) log-mel.

    Per sample, ``time_stripes`` stripes of width uniform in [0, ``time_width``) along time and ``freq_stripes`` of
    width in [0, ``freq_width``) along mel bins, each starting uniformly where it fits (the official code uses
    torchlibrosa ``SpecAugmentation(time_drop_width=64, time_stripes_num=2, freq_drop_width=8, freq_stripes_num=2)``).
    Identity in eval mode.
    """

    def __init__(self, time_width: int = 64, time_stripes: int = 2, freq_width: int = 8, freq_stripes: int = 2) -> None:
        super().__init__()
        self.time_width, self.time_stripes = time_width, time_stripes
        self.freq_width, self.freq_stripes = freq_width, freq_stripes

    def forward(self, x: Tensor) -> Tensor:  # (M, 1, frames, mels)
        if not self.training:
            return x
        keep = self._keep(x.shape[0], x.shape[2], self.time_width, self.time_stripes, x.device)[:, None, :, None]
        keep = keep & self._keep(x.shape[0], x.shape[3], self.freq_width, self.freq_stripes, x.device)[:, None, None]
        return x * keep.to(x.dtype)

    @staticmethod
    def _keep(m: int, total: int, width: int, stripes: int, device: torch.device) -> Tensor:
        """(m, total) bool: False inside each sample's stripes."""
        widths = torch.randint(0, max(min(width, total), 1), (m, stripes), device=device)  # (m, S)
        starts = (torch.rand(m, stripes, device=device) * (total - widths)).long()  # start in [0, total - width)
        pos = torch.arange(total, device=device)[None, None]  # (1, 1, total)
        inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])  # (m, S, total)
        return ~inside.any(1)


def _load_folder(path: str, drop_path_rate: float) -> ClapAudioModel:
    """A ``ClapAudioModel`` folder, or a full ``ClapModel`` folder whose audio tower is taken."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"backbone.audio.pretrained: folder {path!r} does not exist (expected a local "
                                "ClapAudioModel / ClapModel save_pretrained folder; nothing is downloaded)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in audio encoder folder {path!r} (expected save_pretrained output).")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    kwargs = dict(local_files_only=True, dtype=torch.float32)
    if model_type == "clap":
        return ClapModel.from_pretrained(path, **kwargs).audio_model
    return ClapAudioModel.from_pretrained(path, drop_path_rate=drop_path_rate, **kwargs)


def _warn_on_mismatch(hf: ClapAudioConfig, cfg: AudioEncoderConfig) -> None:
    """The folder's config is the truth; say so loudly when the dataclass disagrees with it."""
    pairs = {
        "hidden_size": (hf.patch_embeds_hidden_size, cfg.hidden_size),
        "depths": (list(hf.depths), list(cfg.depths)),
        "num_heads": (list(hf.num_attention_heads), list(cfg.num_heads)),
        "window_size": (hf.window_size, cfg.window_size),
        "spec_size": (hf.spec_size, cfg.spec_size),
        "num_mel_bins": (hf.num_mel_bins, cfg.num_mel_bins),
    }
    diff = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if diff:
        warnings.warn(f"HTS-AT folder config differs from AudioEncoderConfig (folder wins): {diff}", stacklevel=3)


def embed(model: ClapAudioModel, mel: Tensor) -> tuple[Tensor, Grid]:
    """Front part of the library forward: log-mel (M, 1, F, mels) -> tokens (M, N0, C0) and the grid.

    BatchNorm over mel bins on the transposed input, fold into the square "image" (``reshape_mel2img``:
    bicubic time stretch + 4 chunks stacked along frequency), then patch embedding + LayerNorm.
    """
    enc = model.audio_encoder
    x = enc.batch_norm(mel.transpose(1, 3)).transpose(1, 3)  # (M, 1, F, mels)
    augment = getattr(model, "spec_augment", None)
    if augment is not None:
        x = augment(x)  # identity unless the encoder is in train mode
    x = enc.patch_embed(enc.reshape_mel2img(x), None)  # (M, N0, C0)
    return x, tuple(enc.input_resolutions[0])


def block(layer: ClapAudioLayer, x: Tensor, hw: Grid) -> Tensor:
    """A whole HTS-AT block (pre-norm Swin-V1), called exactly like ``ClapAudioStage`` does. x: (M, N, C)."""
    return layer(x, hw)[0]


def window_core(*args: Any) -> Tensor:
    """This encoder's own entry to :func:`shifted_window_attention` (a separate unit for regional compilation)."""
    return shifted_window_attention(*args)


def relative_bias(layer: ClapAudioLayer) -> Tensor:
    """Swin-V1 relative position bias of one block, gathered from its table: (heads, L, L), L = w*w."""
    attn = layer.attention.self
    length = attn.window_size[0] * attn.window_size[1]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    return bias.view(length, length, -1).permute(2, 0, 1)


def attention_mask(layer: ClapAudioLayer, padded: Grid, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive SDPA mask of one block on a padded grid: relative bias + the shift mask (added once, as the library)."""
    shift_mask = layer.get_attn_mask(padded[0], padded[1], dtype=torch.float32, device=device)
    return combine_mask(relative_bias(layer).float(), shift_mask, 1).to(dtype)


def block_fast(layer: ClapAudioLayer, x: Tensor, hw: Grid, cache: FrozenCache, core: Callable[..., Tensor] | None = None,
               linear: Linear = F.linear) -> Tensor:
    """:func:`block` through fused window attention; frozen constants (mask, fused q/k/v) from ``cache``.

    x: (M, N, C). Same window/shift clamping as the library call (``set_shift_and_window_size``), same residual
    structure (``ClapAudioLayer.forward``); equal up to float rounding.
    """
    layer.set_shift_and_window_size(hw)
    attn = layer.attention.self
    win, shift = int(layer.window_size), int(layer.shift_size)
    if win != attn.window_size[0]:  # the library cannot run this either: its bias table is for another window
        return block(layer, x, hw)
    padded = (-(-hw[0] // win) * win, -(-hw[1] // win) * win)
    dtype = mask_dtype(x)
    table = attn.relative_position_bias_table

    def build_mask() -> Tensor:
        return attention_mask(layer, padded, dtype, x.device)

    if not table.requires_grad:
        mask = cache.get(("htsat-mask", id(layer), padded, shift, *tensor_key(table), dtype), build_mask)
    else:
        mask = build_mask()
    if frozen(attn.query, attn.key, attn.value):
        key = (id(layer), *tensor_key(attn.query.weight))
        weight = cache.get(("htsat-qkv-w", *key), lambda: fused_qkv(attn.query, attn.key, attn.value)[0])
        bias = cache.get(("htsat-qkv-b", *key), lambda: fused_qkv(attn.query, attn.key, attn.value)[1])
    else:
        weight, bias = fused_qkv(attn.query, attn.key, attn.value)
    dense = layer.attention.output.dense
    dropout_p = attn.dropout.p if attn.training else 0.0
    out = (core or window_core)(
        layer.layernorm_before(x), hw, win, shift, attn.num_attention_heads, weight, bias, mask, dense.weight,
        dense.bias, None, attn.attention_head_size**-0.5, dropout_p, linear,
    )
    h = x + layer.drop_path(layer.attention.output.dropout(out))
    return h + mlp(layer, layer.layernorm_after(h), linear)


def downsample(stage: ClapAudioStage, x: Tensor, hw: Grid) -> tuple[Tensor, Grid]:
    """End-of-stage patch merging (if the stage has one): (M, H*W, C) -> (M, H/2*W/2, 2C)."""
    if stage.downsample is None:
        return x, hw
    return stage.downsample(x, hw), ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


def stage_grids(model: ClapAudioModel) -> list[Grid]:
    """Token grid (H_s, W_s) of each stage (``audio_encoder.input_resolutions``)."""
    return [(int(h), int(w)) for h, w in model.audio_encoder.input_resolutions]


def stage_dims(model: ClapAudioModel) -> list[int]:
    """Token width of each stage."""
    return [int(stage.dim) for stage in model.audio_encoder.layers]


def library_tokens(model: ClapAudioModel, mel: Tensor) -> Tensor:
    """Last-stage tokens (M, N, C) from the library's own forward (before its final norm), for parity checks.

    The library's ``last_hidden_state`` is normed and regrouped; its last reshaped hidden state is the raw
    stage output laid out as (M, C, H, W), which we flatten back to tokens.
    """
    out = model(input_features=mel, output_hidden_states=True)
    last = out.hidden_states[-1]  # (M, C, H, W)
    return last.flatten(2).transpose(1, 2)
