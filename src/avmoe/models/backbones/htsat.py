"""Frozen HTS-AT audio encoder: the audio tower of ``transformers.ClapAudioModel``, stepped stage by stage.

HTS-AT blocks run atomically (the official AVMoE code never splits them). ``ClapAudioLayer.forward`` mutates its
``window_size``/``shift_size`` when the grid is not larger than the window (transformers ``ClapAudioLayer.set_shift_and_window_size``); calling
the layer exactly as ``ClapAudioStage`` does (``blk(x, hw)``, ``always_partition=False``) keeps the stepped
path identical to the library forward.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import Tensor
from transformers import ClapAudioConfig, ClapAudioModel, ClapModel
from transformers.models.clap.modeling_clap import ClapAudioLayer, ClapAudioStage

from ..config import AudioEncoderConfig

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
        load_htsat_checkpoint(cfg.htsat_checkpoint, model)
    else:
        warnings.warn(
            "AudioEncoderConfig.pretrained and .htsat_checkpoint are None: the HTS-AT audio encoder has RANDOM "
            "weights (fine for tests and demos, meaningless for real training).",
            stacklevel=2,
        )
        model = ClapAudioModel(clap_audio_config(cfg))
    return model.float()


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
    x = enc.patch_embed(enc.reshape_mel2img(x), None)  # (M, N0, C0)
    return x, tuple(enc.input_resolutions[0])


def block(layer: ClapAudioLayer, x: Tensor, hw: Grid) -> Tensor:
    """A whole HTS-AT block (pre-norm Swin-V1), called exactly like ``ClapAudioStage`` does. x: (M, N, C)."""
    return layer(x, hw)[0]


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
