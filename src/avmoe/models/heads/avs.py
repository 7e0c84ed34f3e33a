"""AVS head: multi-scale Swin taps, temporal audio gating, TPAVI fusion and a DPT-style decoder
(yingchengy/AVMOE, official ``avs_{s4,ms3}/model/PVT_AVSModel_v2.py`` and AVSBench ``model/TPAVI.py``).

Pipeline for B clips of T frames (M = B*T):

1. **Taps**: the Swin stage outputs before patch merging (``BackboneOutput.visual_stages``, the last after the
   final norm) -> Linear C_s -> ``channels`` -> map -> bicubic resize to ``mask_size / 4, 8, 16, 32``
   (56/28/14/7 at 224: the PVT-v2 strides the decoder was built for).
2. **Audio**: the per-frame HTS-AT mean token -> Linear -> ``audio_dim`` (128).
3. **Temporal gating** (CMBS-style ``TemporalAttention``), per stage: the spatially pooled map and the audio go
   through bi-LSTMs and 2-layer Transformer encoders over the T frames; ``map *= 1 + gamma * sigmoid(audio
   gate)`` and ``audio *= 1 + gamma * mean_s sigmoid(video gate_s)``. The official module also builds
   cross-modal decoders whose outputs are never used; they are left out (no effect on the outputs).
4. **TPAVI** (dot-product non-local block over T*H*W positions with the audio broadcast over space) on
   ``tpavi_stages``. Dot mode has no softmax, so ``(theta phi^T / N) g = theta (phi^T g) / N`` is computed in
   that order: O(THW * C'^2) instead of a (THW)^2 matrix (15680^2 at stage 0); same parameters, same math.
5. **Decoder**: ``FeatureFusionBlock`` path4 -> path1 (each x2 bilinear, align_corners=True) and
   ``output_conv`` (3x3 -> x2 bilinear -> 3x3 -> ReLU -> 1x1) to ``mask_size`` logits per frame.

Official quirk reproduced: the MiDaS ``ResidualConvUnit`` applies an in-place ReLU to its input, so its skip
connection adds ``relu(x)``, and the TPAVI maps the MS3 masked-AV loss reads are the ReLU'd ones (the decoder
modified them in place before the loss ran). ``stage_map_<s>`` returns exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AVSHeadConfig:
    """Sizes of the AVS head; defaults are the official ones (S4: ``gamma`` 0.05, MS3: 0.1)."""

    channels: int = 256
    """Width of the tap projections, TPAVI and decoder."""
    mask_size: int = 224
    """Side of the output mask logits; the taps are resized to mask_size/4, /8, /16, /32 (multiple of 32)."""
    audio_dim: int = 128
    """Audio projection width (HTS-AT pooled 768 -> 128)."""
    gamma: float = 0.05
    """Strength of the temporal audio/video gates (0.05 S4, 0.1 MS3)."""
    temporal_d_model: int = 256
    """Width of the temporal Transformer encoders of the audio / video gates."""
    temporal_heads: int = 4
    """Attention heads of the temporal Transformer encoders."""
    temporal_ff_dim: int = 1024
    """Feed-forward width of the temporal Transformer encoders."""
    temporal_layers: int = 2
    """Layers of each temporal Transformer encoder."""
    temporal_dropout: float = 0.1
    """Dropout inside the temporal Transformer encoders."""
    proj_dropout: float = 0.2
    """Dropout after the pooled-map projection of the temporal gating."""
    tpavi_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Stages with a TPAVI block (all four in both official scripts)."""
    tpavi_inter_channels: Optional[int] = None
    """TPAVI inner width; None = channels // 2 (official)."""
    output_hidden: list[int] = field(default_factory=lambda: [128, 32])
    """Widths of the two 3x3 convolutions of ``output_conv``."""


def _encoder(d_model: int, cfg: AVSHeadConfig, in_dim: int) -> nn.Sequential:
    """Linear in_dim -> d_model + post-LN Transformer encoder over time (CMBS InternalTemporalRelationModule)."""
    layer = nn.TransformerEncoderLayer(d_model, cfg.temporal_heads, cfg.temporal_ff_dim, cfg.temporal_dropout,
                                       batch_first=True)
    return nn.Sequential(nn.Linear(in_dim, d_model),
                         nn.TransformerEncoder(layer, cfg.temporal_layers, enable_nested_tensor=False))


class StageGate(nn.Module):
    """Temporal gating of one stage: per-frame audio gate for the map, video gate for the audio."""

    def __init__(self, cfg: AVSHeadConfig) -> None:
        super().__init__()
        d = cfg.temporal_d_model
        self.v_fc = nn.Linear(cfg.channels, cfg.channels)
        self.dropout = nn.Dropout(cfg.proj_dropout)
        self.v_lstm = nn.LSTM(cfg.channels, d, batch_first=True, bidirectional=True)
        self.a_lstm = nn.LSTM(cfg.audio_dim, d // 2, batch_first=True, bidirectional=True)
        self.v_encoder = _encoder(d, cfg, 2 * d)
        self.a_encoder = _encoder(d, cfg, 2 * (d // 2))
        self.audio_gate = nn.Linear(d, 1)
        self.video_gate = nn.Linear(d, 1)

    def forward(self, pooled: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:  # (B, T, C), (B, T, A)
        v = self.dropout(F.relu(self.v_fc(pooled)))
        v, _ = self.v_lstm(v)  # (B, T, 2d)
        a, _ = self.a_lstm(audio)  # (B, T, d)
        a_gate = torch.sigmoid(self.audio_gate(self.a_encoder(a)))  # (B, T, 1)
        v_gate = torch.sigmoid(self.video_gate(self.v_encoder(v)))  # (B, T, 1)
        return a_gate, v_gate


class TemporalGating(nn.Module):
    """CMBS-style TemporalAttention over the T frames of every stage (step 3 of the module docstring)."""

    def __init__(self, cfg: AVSHeadConfig, num_stages: int) -> None:
        super().__init__()
        self.gamma = cfg.gamma
        self.stages = nn.ModuleList([StageGate(cfg) for _ in range(num_stages)])

    def forward(self, maps: list[Tensor], audio: Tensor) -> tuple[list[Tensor], Tensor]:
        b, t = audio.shape[:2]
        out, v_gates = [], []
        for x, gate in zip(maps, self.stages):  # x (M, C, h, w)
            a_gate, v_gate = gate(x.mean((-2, -1)).view(b, t, -1), audio)
            out.append(x + a_gate.reshape(b * t, 1, 1, 1) * x * self.gamma)
            v_gates.append(v_gate)
        v_gate = torch.stack(v_gates).mean(0)  # (B, T, 1)
        return out, audio + v_gate * audio * self.gamma


class TPAVI(nn.Module):
    """Temporal pixel-wise audio-visual interaction (AVSBench ``TPAVIModule``, mode ``dot``, 3-D, with BN).

    ``forward(x (M, C, h, w), audio (B, T, A)) -> (z (M, C, h, w), aligned audio (B, T, C))``.
    """

    def __init__(self, channels: int, audio_dim: int, inter_channels: Optional[int] = None) -> None:
        super().__init__()
        self.inter = inter_channels or max(channels // 2, 1)
        self.align_channel = nn.Linear(audio_dim, channels)
        # 1x1x1 Conv3d == per-frame 1x1 Conv2d; phi sees the audio broadcast over space == a Linear on the audio.
        self.g = nn.Conv2d(channels, self.inter, 1)
        self.theta = nn.Conv2d(channels, self.inter, 1)
        self.phi = nn.Linear(channels, self.inter)
        self.w_z = nn.Conv2d(self.inter, channels, 1)
        self.bn = nn.BatchNorm2d(channels)  # BatchNorm3d over (B, C, T, h, w) has the same statistics
        nn.init.zeros_(self.bn.weight)  # the block starts as the identity (+ LayerNorm)
        nn.init.zeros_(self.bn.bias)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        b, t = audio.shape[:2]
        h, w = x.shape[-2:]
        aligned = self.align_channel(audio)  # (B, T, C)
        phi = self.phi(aligned)  # (B, T, C')
        theta = self.theta(x).view(b, t, self.inter, h * w)  # (B, T, C', P)
        g_sum = self.g(x).view(b, t, self.inter, h * w).sum(-1)  # (B, T, C'): phi is constant over space
        kernel = torch.einsum("btc,btd->bcd", phi, g_sum) / (t * h * w)  # (B, C', C') = phi^T g / N
        y = torch.einsum("btcp,bcd->btdp", theta, kernel)  # (B, T, C', P) = f_div_C @ g
        z = self.bn(self.w_z(y.reshape(b * t, self.inter, h, w))) + x
        z = self.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return z, aligned


class ResidualConvUnit(nn.Module):
    """MiDaS residual unit with its in-place-ReLU quirk: ``relu(x) + conv2(relu(conv1(relu(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """``out = up2(rcu2(x + rcu1(skip)))`` (or ``up2(rcu2(x))`` without a skip), bilinear, align_corners=True.

    The deepest block never gets a skip; it is built without ``rcu1`` (``with_skip=False``). The official code
    creates that unit anyway and leaves it without gradient, which made plain DDP stop ("parameters that were not
    used"); older checkpoints that still hold it load through :meth:`AVSTask.on_load_checkpoint`.
    """

    def __init__(self, channels: int, with_skip: bool = True) -> None:
        super().__init__()
        self.rcu1 = ResidualConvUnit(channels) if with_skip else None
        self.rcu2 = ResidualConvUnit(channels)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if skip is not None:
            if self.rcu1 is None:
                raise ValueError("this FeatureFusionBlock was built without a skip input (with_skip=False)")
            x = x + self.rcu1(skip)
        return F.interpolate(self.rcu2(x), scale_factor=2, mode="bilinear", align_corners=True)


class AVSHead(nn.Module):
    """Mask logits per frame from the Swin stage taps and the pooled audio.

    ``forward(stages [(B, T, N_s, C_s)] x4, grids [(H_s, W_s)] x4, audio (B, T, Ca))`` returns ``logits``
    (B, T, S, S) and, for every TPAVI stage s, ``stage_map_<s>`` (M, channels, h, w) (ReLU'd, as the official
    loss sees them) and ``stage_audio_<s>`` (B, T, channels) (the TPAVI-aligned audio).

    Args:
        stage_dims: widths C_s of the four Swin stages.
        audio_in: width of the pooled audio feature.
        cfg: head sizes.
    """

    def __init__(self, stage_dims: list[int], audio_in: int, cfg: AVSHeadConfig = AVSHeadConfig()) -> None:
        super().__init__()
        if len(stage_dims) != 4:
            raise ValueError(f"the AVS decoder needs 4 visual stages, the backbone has {len(stage_dims)}")
        if cfg.mask_size % 32:
            raise ValueError(f"mask_size must be a multiple of 32 (taps at /4../32), got {cfg.mask_size}")
        if any(not 0 <= s < 4 for s in cfg.tpavi_stages):
            raise ValueError(f"tpavi_stages must lie in 0..3, got {cfg.tpavi_stages}")
        if len(cfg.output_hidden) != 2:
            raise ValueError(f"output_hidden needs the widths of the two 3x3 convolutions, got {cfg.output_hidden}")
        self.cfg = cfg
        c = cfg.channels
        self.map_sizes = [cfg.mask_size // 4 >> s for s in range(4)]  # 56, 28, 14, 7 at 224
        self.taps = nn.ModuleList([nn.Linear(d, c) for d in stage_dims])
        self.audio_proj = nn.Linear(audio_in, cfg.audio_dim)
        self.temporal = TemporalGating(cfg, 4)
        self.tpavi = nn.ModuleDict({str(s): TPAVI(c, cfg.audio_dim, cfg.tpavi_inter_channels)
                                    for s in sorted(set(cfg.tpavi_stages))})
        self.paths = nn.ModuleList([FeatureFusionBlock(c, with_skip=s < 3) for s in range(4)])  # path1..path4
        h1, h2 = cfg.output_hidden
        self.output_conv = nn.Sequential(nn.Conv2d(c, h1, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"),
                                         nn.Conv2d(h1, h2, 3, padding=1), nn.ReLU(), nn.Conv2d(h2, 1, 1))

    def modality_modules(self) -> dict[str, list[nn.Module]]:
        """Uni-modal branches: tap projections and visual temporal path / audio projection and audio path."""
        gates = list(self.temporal.stages)
        return {
            "audio": [self.audio_proj, *[m for g in gates for m in (g.a_lstm, g.a_encoder)]],
            "visual": [self.taps, *[m for g in gates for m in (g.v_fc, g.v_lstm, g.v_encoder)]],
        }

    def tap_maps(self, stages: list[Tensor], grids: list[tuple[int, int]]) -> list[Tensor]:
        """Stage tokens (B, T, N_s, C_s) -> maps (M, channels, size_s, size_s)."""
        maps = []
        for s, (tokens, (h, w)) in enumerate(zip(stages, grids)):
            x = self.taps[s](tokens.flatten(0, 1))  # (M, N_s, C)
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # (M, C, h, w)
            size = self.map_sizes[s]
            maps.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False))
        return maps

    def forward(self, stages: list[Tensor], grids: list[tuple[int, int]], audio: Tensor) -> dict[str, Tensor]:
        b, t = audio.shape[:2]
        maps = self.tap_maps(stages, grids)
        maps, a = self.temporal(maps, self.audio_proj(audio))  # a (B, T, audio_dim)
        out: dict[str, Tensor] = {}
        for key, block in self.tpavi.items():
            s = int(key)
            maps[s], out[f"stage_audio_{s}"] = block(maps[s], a)
        x = self.paths[3](maps[3])  # 2x the stage-3 size
        for s in (2, 1, 0):
            x = self.paths[s](x, maps[s])
        logits = self.output_conv(x)  # (M, 1, S, S)
        out["logits"] = logits.view(b, t, *logits.shape[-2:])
        for key in self.tpavi:
            out[f"stage_map_{key}"] = F.relu(maps[int(key)])  # what the official loss reads (see docstring)
        return out
