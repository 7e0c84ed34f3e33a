"""AVE head: CMBS temporal attention + CMBS classifier, as in the official AVMoE AVE code.

Official source (yingchengy/AVMOE): ``AVMOE/AVE/nets/net_trans_v3.py`` (``TemporalAttention``, ``CMBS``,
``SupvLocalizeModule``, ``InternalTemporalRelationModule``, ``CrossModalRelationAttModule``) and
``AVMOE/AVE/nets/models.py`` (``EncoderLayer``, ``DecoderLayer``, borrowed from CMRAN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
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
    decoder: Literal["cmbs", "transformer"] = "cmbs"
    """Cross-modal decoder. ``cmbs`` (official): no self-attention; the query is an affine projection of the
    modality's own BiLSTM output and the memory is [other modality's encoder output; query]. ``transformer``
    (avmoe before 2026-12): an ``nn.TransformerDecoderLayer`` (self-attention, then cross-attention) whose query is
    the modality's own encoder output and whose memory is [other encoder output; own encoder output]."""


def _encoder(cfg: AVEHeadConfig, layers: int) -> nn.TransformerEncoder:
    # Post-norm ReLU layer = the official EncoderLayer (self-attn, add, norm1, FFN, add, norm2).
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class CrossModalDecoderLayer(nn.Module):
    """The CMBS cross-modal relation layer: cross-attention of the query over [memory; query], then a post-norm FFN.

    Unlike ``nn.TransformerDecoderLayer`` there is no self-attention block (the official ``DecoderLayer`` builds one
    and never calls it).
    """

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ff_dim)
        self.linear2 = nn.Linear(ff_dim, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:  # query (B, T, d), memory (B, S, d)
        memory = torch.cat([memory, query], dim=1)  # (B, S + T, d)
        x = self.norm1(query + self.dropout1(self.multihead_attn(query, memory, memory, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def _transformer_decoder(cfg: AVEHeadConfig) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout, batch_first=True)
    return nn.TransformerDecoder(layer, 1)


class AVEHead(nn.Module):
    """Temporal attention over T segments of pooled audio and visual features.

    Returns ``is_event`` (B, T) logits, ``event_scores`` (B, C) video-level class scores and ``av_score`` (B, C).
    """

    def __init__(self, visual_in: int, audio_in: int, cfg: AVEHeadConfig = AVEHeadConfig()) -> None:
        super().__init__()
        if cfg.decoder not in ("cmbs", "transformer"):
            raise ValueError(f"AVEHeadConfig.decoder must be 'cmbs' or 'transformer', got {cfg.decoder!r}")
        self.cfg = cfg
        d = cfg.d_model
        self.v_proj = nn.Sequential(nn.Linear(visual_in, cfg.visual_dim), nn.ReLU(), nn.Dropout(cfg.proj_dropout))
        self.a_proj = nn.Linear(audio_in, cfg.audio_dim)
        self.v_lstm = nn.LSTM(cfg.visual_dim, cfg.visual_dim // 2, batch_first=True, bidirectional=True)
        self.a_lstm = nn.LSTM(cfg.audio_dim, cfg.audio_dim, batch_first=True, bidirectional=True)
        self.v_in = nn.Linear(cfg.visual_dim, d)
        self.a_in = nn.Linear(2 * cfg.audio_dim, d)
        self.v_encoder, self.a_encoder = _encoder(cfg, cfg.num_layers), _encoder(cfg, cfg.num_layers)
        if cfg.decoder == "cmbs":
            # Official CrossModalRelationAttModule.affine_matrix: the decoder query from the BiLSTM output.
            self.v_query = nn.Linear(cfg.visual_dim, d)
            self.a_query = nn.Linear(2 * cfg.audio_dim, d)
            self.v_decoder: nn.Module = CrossModalDecoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout)
            self.a_decoder: nn.Module = CrossModalDecoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout)
        else:
            self.v_decoder, self.a_decoder = _transformer_decoder(cfg), _transformer_decoder(cfg)
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
        if self.cfg.decoder == "cmbs":
            v_out = self.v_decoder(self.v_query(v), a_enc)  # memory [a_enc; query] inside the layer
            a_out = self.a_decoder(self.a_query(a), v_enc)
        else:
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
