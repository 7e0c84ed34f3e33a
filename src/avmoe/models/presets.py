"""Ready-made configurations: the official per-task adapter settings and a CPU-fast tiny backbone.

``PAPER_CONFIGS[task]`` is the adapter configuration of the released run script (yingchengy/AVMOE ``train.sh`` / ``train_v2.sh`` per task;
load-balance weights as scripted, see :func:`avmoe.models.moe.load_balance_loss` for the official loss's E-fold scale);
``paper_config(task)`` is the full paper-scale :class:`AVMoEConfig` for it; ``tiny_config(**overrides)`` is a
small backbone for tests and demos (a forward of B=2, T=10 takes a fraction of a second on a CPU).
"""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass, replace
from typing import Any

from .config import AdapterConfig, AudioEncoderConfig, AVMoEConfig, VisualEncoderConfig

PAPER_CONFIGS: dict[str, AdapterConfig] = {
    # AVMOE/AVE/train.sh: 1+1 experts, skip stages 1 and 3, BN, gated audio adapters.
    "ave": AdapterConfig(
        num_cross_experts=1, num_uni_experts=1, uni_expert="linear", num_latents=32, reduction=8,
        conv_groups=2, use_bn=True, audio_gate=True, num_skip=2,
    ),
    # AVMOE/AVQA/train_v2.sh: 1+2 experts, all 12 positions, 2 latent tokens, 4 conv groups, ungated audio.
    "avqa": AdapterConfig(
        num_cross_experts=1, num_uni_experts=2, uni_expert="linear", num_latents=2, reduction=8,
        conv_groups=4, use_bn=False, audio_gate=False, num_skip=1,
    ),
    # AVMOE/AVVP/train.sh: parameter-free token attention UA, load balancing x1.0.
    "avvp": AdapterConfig(
        num_cross_experts=1, num_uni_experts=1, uni_expert="param_free", num_latents=32, reduction=8,
        conv_groups=2, use_bn=False, audio_gate=True, num_skip=1, load_balance_weight=1.0,
    ),
    # avs_s4/train_v2.sh: MHA-across-frames UA, router noise 0.01, ungated audio.
    "avs_s4": AdapterConfig(
        num_cross_experts=1, num_uni_experts=1, uni_expert="mha_frames", num_latents=32, reduction=8,
        conv_groups=2, use_bn=False, audio_gate=False, num_skip=1, router_noise_std=0.01,
    ),
    # avs_ms3/train_v2.sh: 2+2 experts, latent-token UA, r=2 (script default), skip 2, router noise, LB x0.01.
    "avs_ms3": AdapterConfig(
        num_cross_experts=2, num_uni_experts=2, uni_expert="latent", num_latents=32, reduction=2,
        conv_groups=2, use_bn=False, audio_gate=False, num_skip=2, router_noise_std=0.01,
        load_balance_weight=0.01,
    ),
}


def paper_adapter(task: str) -> AdapterConfig:
    """A fresh copy of the official adapter configuration of ``task`` (one of ``PAPER_CONFIGS``)."""
    if task not in PAPER_CONFIGS:
        raise KeyError(f"unknown task {task!r}; expected one of {sorted(PAPER_CONFIGS)}")
    return copy.deepcopy(PAPER_CONFIGS[task])


def paper_config(task: str, **overrides: Any) -> AVMoEConfig:
    """Paper-scale backbone (Swin-V2-L/192 + HTS-AT tiny) with the official adapters of ``task``.

    The released S4 script leaves HTS-AT trainable; that quirk is reproduced here (override ``audio`` to undo).
    """
    config = AVMoEConfig(adapter=paper_adapter(task))
    if task == "avs_s4":
        config.audio.trainable = True
    return _apply(config, overrides)


def tiny_config(**overrides: Any) -> AVMoEConfig:
    """A CPU-fast backbone with the paper's structure (4 stages, 18/6-style 3:1 pairing in stage 2).

    Swin-V2: 64 px, patch 4, width 32, depths [2, 2, 6, 2], window 4 (grids 16/8/4/2; the window is clamped to
    the grid from stage 2 on, as at paper scale). HTS-AT: 32 mel bins, spec 64, width 32, depths [2, 2, 2, 2],
    window 2 (grids 16/8/4/2). Library constraints behind these numbers: every HTS-AT grid must be >= its window
    (else ``ClapAudioLayer`` cannot index its bias table), and the last grid must be a multiple of
    ``spec_size // num_mel_bins`` (else the library forward's final regrouping divides by zero).
    Widths are multiples of 32 so every ``PAPER_CONFIGS`` entry (r=8 with 4 conv groups) is valid at this scale.
    ``overrides``: top-level fields; a dict value for ``visual``/``audio``/``adapter`` updates those fields only.
    """
    config = AVMoEConfig(
        visual=VisualEncoderConfig(
            image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 2, 4], window_size=4,
            drop_path_rate=0.0,
        ),
        audio=AudioEncoderConfig(
            num_mel_bins=32, spec_size=64, patch_size=4, hidden_size=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
            window_size=2,
        ),
        adapter=AdapterConfig(num_latents=4, reduction=4, router_hidden=[16, 8]),
    )
    return _apply(config, overrides)


def _apply(config: AVMoEConfig, overrides: dict[str, Any]) -> AVMoEConfig:
    names = {f.name for f in fields(config)}
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(f"unknown AVMoEConfig field {key!r}")
        current = getattr(config, key)
        if isinstance(value, dict) and is_dataclass(current):
            value = replace(current, **value)
        setattr(config, key, value)
    return config
