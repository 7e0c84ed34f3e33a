"""AVE head: CMBS-style temporal attention + CMBS classifier (yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py``, after CMBS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AVEHeadConfig:
    """Sizes of the temporal-attention head; defaults are the official ones."""

    visual_dim: int = 512
    """Visual projection width (Swin pooled 1536 -> 512, ReLU, dropout)."""
    audio_dim: int = 128
    """Audio projection width (HTS-AT pooled 768 -> 128)."""
    d_model: int = 256
    """Width of the temporal relation encoders and decoder."""
    num_heads: int = 4
    """Attention heads of the temporal relation encoders and decoder."""
    ff_dim: int = 1024
    """Feed-forward width of the temporal relation layers."""
    num_layers: int = 2
    """Layers of each internal temporal relation encoder."""
    dropout: float = 0.1
    """Dropout inside the temporal relation layers."""
    proj_dropout: float = 0.2
    """Dropout after the visual / audio input projections."""
    topk: int = 4
    """Segments averaged for the per-modality class activation score."""
    gate_scale: float = 0.1
    """Strength of the cross-modal gates: ``v = v + gate_a * v * gate_scale`` (and the same for audio)."""
    av_score_weight: float = 0.3
    """Weight of the audio-visual class activation score added to the event class logits."""
    num_classes: int = 28
    """Event classes (AVE: 28; background is predicted by ``is_event``)."""


def _encoder(cfg: AVEHeadConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _decoder(cfg: AVEHeadConfig) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout, batch_first=True)
    return nn.TransformerDecoder(layer, 1)


class AVEHead(nn.Module):
    """Temporal attention over T segments of pooled audio and visual features.

    Returns ``is_event`` (B, T) logits, ``event_scores`` (B, C) video-level class scores and ``av_score`` (B, C).
    """

    def __init__(self, visual_in: int, audio_in: int, cfg: AVEHeadConfig = AVEHeadConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.v_proj = nn.Sequential(nn.Linear(visual_in, cfg.visual_dim), nn.ReLU(), nn.Dropout(cfg.proj_dropout))
        self.a_proj = nn.Linear(audio_in, cfg.audio_dim)
        self.v_lstm = nn.LSTM(cfg.visual_dim, cfg.visual_dim // 2, batch_first=True, bidirectional=True)
        self.a_lstm = nn.LSTM(cfg.audio_dim, cfg.audio_dim, batch_first=True, bidirectional=True)
        self.v_in = nn.Linear(cfg.visual_dim, d)
        self.a_in = nn.Linear(2 * cfg.audio_dim, d)
        self.v_encoder, self.a_encoder = _encoder(cfg, cfg.num_layers), _encoder(cfg, cfg.num_layers)
        self.v_decoder, self.a_decoder = _decoder(cfg), _decoder(cfg)
        self.v_gate, self.a_gate = nn.Linear(d, 1), nn.Linear(d, 1)
        self.v_cas, self.a_cas = nn.Linear(d, cfg.num_classes), nn.Linear(d, cfg.num_classes)
        self.event_head = nn.Linear(d, 1)
        self.class_head = nn.Linear(d, cfg.num_classes)

    def modality_modules(self) -> dict[str, list[nn.Module]]:
        """Uni-modal branches; the cross-modal decoders, gates and fused classifiers belong to neither."""
        return {
            "audio": [self.a_proj, self.a_lstm, self.a_in, self.a_encoder, self.a_cas],
            "visual": [self.v_proj, self.v_lstm, self.v_in, self.v_encoder, self.v_cas],
        }

    def forward(self, visual: Tensor, audio: Tensor) -> dict[str, Tensor]:  # visual (B, T, Cv), audio (B, T, Ca)
        v, _ = self.v_lstm(self.v_proj(visual))  # (B, T, visual_dim)
        a, _ = self.a_lstm(self.a_proj(audio))  # (B, T, 2 * audio_dim)
        v_enc = self.v_encoder(self.v_in(v))  # (B, T, d)
        a_enc = self.a_encoder(self.a_in(a))
        v_out = self.v_decoder(v_enc, torch.cat([a_enc, v_enc], dim=1))  # query own, memory [other; own]
        a_out = self.a_decoder(a_enc, torch.cat([v_enc, a_enc], dim=1))
        a_gate = torch.sigmoid(self.a_gate(a_enc))  # (B, T, 1)
        v_gate = torch.sigmoid(self.v_gate(v_enc))
        v_out = v_out + a_gate * v_out * self.cfg.gate_scale
        a_out = a_out + v_gate * a_out * self.cfg.gate_scale
        return self._classify(v_out, a_out)

    def _classify(self, v: Tensor, a: Tensor) -> dict[str, Tensor]:
        k = min(self.cfg.topk, v.shape[1])
        s_v = self.v_cas(v).topk(k, dim=1).values.mean(1)  # (B, C)
        s_a = self.a_cas(a).topk(k, dim=1).values.mean(1)
        av_score = (s_v + s_a) / 2
        fused = (v + a) / 2  # (B, T, d)
        is_event = self.event_head(fused).squeeze(-1)  # (B, T)
        class_logits = self.class_head(fused.max(dim=1).values)  # (B, C)
        return {"is_event": is_event, "event_scores": class_logits + self.cfg.av_score_weight * av_score,
                "av_score": av_score}
