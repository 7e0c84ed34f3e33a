"""AVVP head: the Multi-modal Grouping Network (MGN, Mo & Tian, NeurIPS 2022) as used by AVMoE
(yingchengy/AVMOE ``AVMOE/AVVP`` ``nets/mgn.py`` + ``nets/grouping.py``).

Per clip of T one-second segments:

1. project the pooled backbone features to ``dim`` (audio 768 -> 128; visual 1536 -> 128, optionally fused with
   R(2+1)D features 512 -> 128 through ``fc_fusion`` as officially);
2. class-aware unimodal grouping: 25 learnable class tokens (zero-initialised) are appended to the T segment
   tokens, ``depth`` transformer blocks run over all of them, then a grouping block assigns the T segments to
   the 25 class groups (softmax over the groups). The audio branch first passes its segments through a
   HAN-style grouping block driven by the visual segments (official ``use_han=True``);
3. modality-aware cross-modal grouping: the 25 audio groups and the 25 visual groups go through ``depth_av``
   blocks and the visual groups re-group the audio groups;
4. outputs: video-level probabilities ``sigmoid(fc_prob(x))``; per-modality video-level probabilities
   ``sigmoid(fc_prob_a(x_a))`` / ``sigmoid(fc_prob_v(x_v))``; segment probabilities = modality probability of
   the class x the segment's weight for that class group (``segment_weights``: official ``1 + softmax over the
   segments of the assignment``, or the assignment itself); class-token logits ``fc_cls(tokens)`` for the token
   classification loss.

Differences from the official code, on purpose: multi-head attention uses ``scaled_dot_product_attention``
with separate q/k/v projections (the official self-attention fuses them into one Linear: same function,
different parameter layout; ``python -m avmoe.convert_official`` splits it); the R(2+1)D stream is optional
(``st_dim = 0`` uses the Swin stream alone); clips are independent (the official code lays the pooled features of
a batch out as one (1, B*T) sequence, which is only right at its batch size 1).

``arch: mmil`` selects the AVVP-ECCV20 baseline instead (Tian et al. 2020, ``nets/net_audiovisual.py``): one
hybrid-attention (HAN) layer shared by both modalities, per-segment per-modality sigmoid class probabilities and
attentive MMIL pooling (softmax over segments and over the two modalities). Same outputs except the class-token
logits. MGN's zero-initialised class tokens need thousands of steps to separate, so the tiny CPU demo uses
``mmil``; paper-scale AVMoE uses ``mgn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Assign = Literal["soft", "hard"]
SegmentWeights = Literal["official", "assignment"]
Arch = Literal["mgn", "mmil"]


@dataclass
class AVVPHeadConfig:
    """AVVP head sizes; defaults are the official AVVP run (``AVMOE/AVVP/train.sh``: MGN, dim 128, depths 3/3/6)."""

    arch: Arch = "mgn"
    """``mgn`` (AVMoE's head) or ``mmil`` (the AVVP-ECCV20 HAN + attentive MMIL baseline; official dim 512,
    1 head, dropout 0.1)."""
    num_classes: int = 25
    """Event classes (LLP: 25)."""
    num_segments: int = 10
    """T: the HAN grouping block mixes over the segment axis, so the clip length is part of the weights."""
    dim: int = 128
    """Token width of the grouping transformer blocks."""
    depth_audio: int = 3
    """Transformer blocks of the audio class-aware grouping."""
    depth_visual: int = 3
    """Transformer blocks of the visual class-aware grouping."""
    depth_av: int = 6
    """Transformer blocks of the cross-modal grouping."""
    num_heads: int = 8
    """Attention heads of every transformer block."""
    mlp_ratio: float = 4.0
    """Feed-forward width of the transformer blocks as a multiple of ``dim``."""
    drop_path: float = 0.1
    """Stochastic depth of every transformer block (constant, as official)."""
    unimodal_assign: Assign = "soft"
    """Class-aware unimodal grouping: soft (softmax) or hard (straight-through Gumbel in training)."""
    crossmodal_assign: Assign = "soft"
    """Cross-modal grouping: soft (softmax) or hard (straight-through Gumbel in training)."""
    segment_weights: SegmentWeights = "official"
    """Segment probability = modality probability x weight. ``official``: with soft unimodal assignment the weight
    is the ``soft`` entry of the official ``AssignAttention`` attention dict, ``1 + softmax_segments(assignment)``
    (in (1, 2): ``AVMOE/AVVP/nets/grouping.py`` ``AssignAttention.forward``, read by ``nets/mgn.py``); with hard
    assignment the hard assignment. ``assignment``: the assignment itself (softmax over the class groups), so a
    segment passes 0.5 for at most one class of a modality."""
    st_dim: int = 0
    """Width of optional spatio-temporal visual features (R(2+1)D-18: 512) in ``batch["visual_st"]``; 0: none."""
    dropout: float = 0.1
    """``mmil`` only: dropout of the HAN layer."""


class DropPath(nn.Module):
    """Per-sample stochastic depth (identity in eval)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class Attention(nn.Module):
    """Multi-head attention with q/k/v projections (scale 1/sqrt(head_dim))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:  # (B, N, C), (B, S, C) -> (B, N, C)
        b, n, c = query.shape
        h = self.num_heads
        q = self.q(query).view(b, n, h, c // h).transpose(1, 2)  # (B, h, N, c/h)
        k = self.k(key).view(b, -1, h, c // h).transpose(1, 2)
        v = self.v(key).view(b, -1, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, c/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class AttnBlock(nn.Module):
    """Pre-norm transformer block over one token sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C)
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Queries attend to keys; post-norm variant of the grouping blocks (query/key are not normalised)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm_post = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:  # (B, N, C), (B, S, C) -> (B, N, C)
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


def hard_softmax(logits: Tensor, dim: int) -> Tensor:
    """One-hot argmax in the forward pass, softmax gradient in the backward pass (straight-through)."""
    soft = logits.softmax(dim)
    hard = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def gumbel_hard_softmax(logits: Tensor, dim: int) -> Tensor:
    """Straight-through Gumbel-softmax (tau 1) along ``dim``."""
    gumbel = -torch.empty_like(logits).exponential_().log()  # ~ Gumbel(0, 1)
    return hard_softmax(logits + gumbel, dim)


class AssignAttention(nn.Module):
    """Single-head assignment of S tokens to N groups: softmax over the *groups* for every token.

    Returns the grouped features (B, N, C) and the soft assignment (B, N, S) (the hard one when ``hard``).
    Features are averaged with the official normalisation ``a / (sum_tokens a + 1)``.
    """

    def __init__(self, dim: int, hard: bool) -> None:
        super().__init__()
        self.hard = hard
        self.scale = dim**-0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, groups: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, N, C), (B, S, C)
        logits = self.q(groups) @ self.k(tokens).transpose(1, 2) * self.scale  # (B, N, S)
        if self.hard:
            assign = gumbel_hard_softmax(logits, dim=1) if self.training else hard_softmax(logits, dim=1)
        else:
            assign = logits.softmax(dim=1)
        weights = assign / (assign.sum(-1, keepdim=True) + 1.0)  # assign_eps = 1, as official
        return self.proj(weights @ self.v(tokens)), assign


class GroupingBlock(nn.Module):
    """Group S tokens into N output groups seeded by ``num_group_tokens`` group tokens (GroupViT-style).

    Group tokens are mixed over the token axis (MLP ``num_group_tokens -> num_groups``), refined by cross-attention
    to the tokens, then every token is assigned to a group.
    """

    def __init__(self, dim: int, num_heads: int, num_group_tokens: int, num_groups: int, hard: bool) -> None:
        super().__init__()
        self.norm_tokens, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_tokens, int(0.5 * dim), num_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads)
        self.assign = AssignAttention(dim, hard=hard)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim, dim)

    def forward(self, x: Tensor, group_tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, S, C), (B, G, C)
        x = self.norm_x(x)
        groups = self.mlp_inter(self.norm_tokens(group_tokens).transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        groups = self.pre_assign_attn(self.norm_post_tokens(groups), x)
        new_x, assign = self.assign(groups, x)
        new_x = new_x + groups
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), assign  # (B, N, C), (B, N, S)


class ModalityGrouping(nn.Module):
    """Transformer blocks over ``[tokens; group tokens]``, an optional HAN step, then grouping (``ModalityTrans``).

    Args:
        cfg: head configuration.
        depth: transformer blocks.
        hard: hard (Gumbel) assignment in the grouping block.
        use_han: audio branch: the segments are first re-grouped by the other modality's segments with a
            hard Gumbel grouping block when ``hard`` is false (and soft when it is true), as officially.
    """

    def __init__(self, cfg: AVVPHeadConfig, depth: int, hard: bool, use_han: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AttnBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path) for _ in range(depth)
        )
        self.num_group_tokens = cfg.num_classes
        self.han = (
            GroupingBlock(cfg.dim, cfg.num_heads, cfg.num_segments, cfg.num_segments, hard=not hard)
            if use_han else None
        )
        self.grouping = GroupingBlock(cfg.dim, cfg.num_heads, cfg.num_classes, cfg.num_classes, hard=hard)

    def forward(self, x: Tensor, group_tokens: Tensor, x_other: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x (B, S, C), group_tokens (G, C) or (B, G, C), x_other (B, S, C) -> groups (B, G, C), assign (B, G, S)."""
        group_tokens = group_tokens.expand(x.shape[0], -1, -1)
        h = torch.cat([x, group_tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        x, group_tokens = h[:, : -self.num_group_tokens], h[:, -self.num_group_tokens :]
        if self.han is not None and x_other is not None:
            x, _ = self.han(x, x_other)  # the other modality's segments seed the groups
        return self.grouping(x, group_tokens)


class ClassTokens(nn.Module):
    """Learnable per-class tokens (zero-initialised, as officially); a Module so it has a modality owner."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))


class MGNHead(nn.Module):
    """MGN on per-segment pooled features (see module docstring).

    Returns ``global_prob`` (B, C), ``audio_prob`` / ``visual_prob`` (B, C), ``audio_seg_prob`` /
    ``visual_seg_prob`` (B, C, T) and ``audio_cls_logits`` / ``visual_cls_logits`` (C, C).
    """

    def __init__(self, visual_in: int, audio_in: int, cfg: AVVPHeadConfig = AVVPHeadConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.fc_a = nn.Linear(audio_in, d)
        self.fc_v = nn.Linear(visual_in, d)
        self.fc_st = nn.Linear(cfg.st_dim, d) if cfg.st_dim else None
        self.fc_fusion = nn.Linear(2 * d, d) if cfg.st_dim else None
        self.audio_token, self.visual_token = ClassTokens(cfg.num_classes, d), ClassTokens(cfg.num_classes, d)
        unimodal_hard = cfg.unimodal_assign == "hard"
        self.audio_cug = ModalityGrouping(cfg, cfg.depth_audio, unimodal_hard, use_han=True)
        self.visual_cug = ModalityGrouping(cfg, cfg.depth_visual, unimodal_hard)
        self.av_mcg = ModalityGrouping(cfg, cfg.depth_av, cfg.crossmodal_assign == "hard")
        self.fc_prob, self.fc_prob_a, self.fc_prob_v = nn.Linear(d, 1), nn.Linear(d, 1), nn.Linear(d, 1)
        self.fc_cls = nn.Linear(d, cfg.num_classes)
        self.apply(_init_weights)

    def modality_modules(self) -> dict[str, list[nn.Module]]:
        """Uni-modal branches; the cross-modal grouping, fused classifier and shared ``fc_cls`` belong to neither."""
        visual = [m for m in (self.fc_v, self.fc_st, self.fc_fusion) if m is not None]
        return {
            "audio": [self.fc_a, self.audio_token, self.audio_cug, self.fc_prob_a],
            "visual": [*visual, self.visual_token, self.visual_cug, self.fc_prob_v],
        }

    def forward(self, visual: Tensor, audio: Tensor, visual_st: Optional[Tensor] = None) -> dict[str, Tensor]:
        """visual (B, T, Cv), audio (B, T, Ca), visual_st (B, T, st_dim) when ``st_dim`` > 0."""
        if visual.shape[1] != self.cfg.num_segments:
            raise ValueError(f"MGNHead was built for {self.cfg.num_segments} segments, got {visual.shape[1]}")
        x_a = self.fc_a(audio)  # (B, T, d)
        x_v = self.fc_v(visual)
        if self.fc_st is not None:
            if visual_st is None:
                raise ValueError(f"MGNHead has st_dim={self.cfg.st_dim} but the batch has no 'visual_st' features")
            x_v = self.fc_fusion(torch.cat([x_v, self.fc_st(visual_st)], dim=-1))
        g_v, assign_v = self.visual_cug(x_v, self.visual_token.weight)  # (B, C, d), (B, C, T)
        g_a, assign_a = self.audio_cug(x_a, self.audio_token.weight, x_other=x_v)
        g_av, _ = self.av_mcg(g_a, g_v)  # audio groups re-grouped by the visual groups
        audio_prob = torch.sigmoid(self.fc_prob_a(g_a)).squeeze(-1)  # (B, C)
        visual_prob = torch.sigmoid(self.fc_prob_v(g_v)).squeeze(-1)
        assign_a, assign_v = self._segment_weights(assign_a), self._segment_weights(assign_v)
        return {
            "global_prob": torch.sigmoid(self.fc_prob(g_av)).squeeze(-1),
            "audio_prob": audio_prob,
            "visual_prob": visual_prob,
            "audio_seg_prob": audio_prob.unsqueeze(-1) * assign_a,  # (B, C, T)
            "visual_seg_prob": visual_prob.unsqueeze(-1) * assign_v,
            "audio_cls_logits": self.fc_cls(self.audio_token.weight),  # (C, C)
            "visual_cls_logits": self.fc_cls(self.visual_token.weight),
        }


    def _segment_weights(self, assign: Tensor) -> Tensor:  # (B, C, T)
        if self.cfg.segment_weights == "official" and self.cfg.unimodal_assign == "soft":
            return 1.0 + assign.softmax(-1)  # the official "soft" attention: softmax over segments, plus one
        return assign


class HANLayer(nn.Module):
    """Hybrid attention: each segment attends to its own modality (self) and the other one (cross), then an FFN;
    post-norm, as AVVP-ECCV20 ``HANLayer``."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cm_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop_cm, self.drop_self, self.drop_ffn = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:  # (B, T, d), (B, T, d) -> (B, T, d)
        cross = self.cm_attn(x, other, other, need_weights=False)[0]
        own = self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norm1(x + self.drop_cm(cross) + self.drop_self(own))
        return self.norm2(x + self.drop_ffn(self.ffn(x)))


class MMILHead(nn.Module):
    """HAN + attentive MMIL pooling (``arch: mmil``); outputs as :class:`MGNHead` without the class-token logits."""

    def __init__(self, visual_in: int, audio_in: int, cfg: AVVPHeadConfig = AVVPHeadConfig(arch="mmil")) -> None:
        super().__init__()
        self.cfg = cfg
        d, c = cfg.dim, cfg.num_classes
        self.fc_a = nn.Linear(audio_in, d)
        self.fc_v = nn.Linear(visual_in, d)
        self.fc_st = nn.Linear(cfg.st_dim, d) if cfg.st_dim else None
        self.fc_fusion = nn.Linear(2 * d, d) if cfg.st_dim else None
        self.han = HANLayer(d, cfg.num_heads, cfg.dropout)  # one layer for both directions, as official
        self.fc_prob, self.fc_frame_att, self.fc_av_att = nn.Linear(d, c), nn.Linear(d, c), nn.Linear(d, c)

    def modality_modules(self) -> dict[str, list[nn.Module]]:
        """Input projections only: the HAN layer and the classifiers are shared by both modalities."""
        return {"audio": [self.fc_a], "visual": [m for m in (self.fc_v, self.fc_st, self.fc_fusion) if m is not None]}

    def forward(self, visual: Tensor, audio: Tensor, visual_st: Optional[Tensor] = None) -> dict[str, Tensor]:
        x_a = self.fc_a(audio)  # (B, T, d)
        x_v = self.fc_v(visual)
        if self.fc_st is not None:
            if visual_st is None:
                raise ValueError(f"MMILHead has st_dim={self.cfg.st_dim} but the batch has no 'visual_st' features")
            x_v = self.fc_fusion(torch.cat([x_v, self.fc_st(visual_st)], dim=-1))
        x = torch.stack([self.han(x_a, x_v), self.han(x_v, x_a)], dim=2)  # (B, T, 2, d)
        frame_prob = torch.sigmoid(self.fc_prob(x))  # (B, T, 2, C)
        temporal = torch.softmax(self.fc_frame_att(x), dim=1) * frame_prob  # attention over segments
        modality = torch.softmax(self.fc_av_att(x), dim=2)  # attention over audio / visual
        return {
            "global_prob": (temporal * modality).sum(dim=(1, 2)),  # (B, C)
            "audio_prob": temporal[:, :, 0].sum(1),
            "visual_prob": temporal[:, :, 1].sum(1),
            "audio_seg_prob": frame_prob[:, :, 0].transpose(1, 2),  # (B, C, T)
            "visual_seg_prob": frame_prob[:, :, 1].transpose(1, 2),
        }


def build_avvp_head(visual_in: int, audio_in: int, cfg: AVVPHeadConfig) -> nn.Module:
    """The head selected by ``cfg.arch``."""
    if cfg.arch == "mgn":
        return MGNHead(visual_in, audio_in, cfg)
    if cfg.arch == "mmil":
        return MMILHead(visual_in, audio_in, cfg)
    raise ValueError(f"unknown AVVP head arch {cfg.arch!r}; expected 'mgn' or 'mmil'")


def _init_weights(m: nn.Module) -> None:
    """Official MGN init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
