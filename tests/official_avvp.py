"""Transcription of the official AVMoE AVVP head (MGN), for equality tests only.

Written from yingchengy/AVMOE ``AVMOE/AVVP/nets/grouping.py`` (``Mlp`` 9-26, ``hard_softmax`` 35-42,
``AssignAttention`` 70-156, ``GroupingBlock`` 167-273 (``GroupingBlock_Han`` 276-382 is the same code),
``Attention`` 385-459, ``CrossAttnBlock`` 462-497, ``AttnBlock`` 500-531, ``ModalityTrans`` 662-770) and
``AVMOE/AVVP/nets/mgn.py`` (``MGN_Net.__init__`` 234-314 head layers, ``forward`` 515-559), eval mode only (the
Gumbel branch runs in training only), with the official attribute names. Hard-coded 25 classes / 10 segments /
8 heads are parameters here. ``forward`` takes the encoder outputs of one clip laid out as the official does:
``f_v.mean(1, keepdim=True).permute(1, 0, 2)`` is (1, B*T, C), i.e. batch size 1 (``AVMOE/AVVP/train.sh``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), nn.GELU(), \
            nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def hard_softmax(logits: Tensor, dim: int) -> Tensor:
    y_soft = logits.softmax(dim)
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def _heads(x: Tensor, h: int) -> Tensor:  # rearrange 'b n (h c) -> b h n c'
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:  # rearrange 'b h n c -> b n (h c)'
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class AssignAttention(nn.Module):
    def __init__(self, dim: int, hard: bool, gumbel: bool) -> None:
        super().__init__()
        self.num_heads, self.scale = 1, dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.hard, self.gumbel, self.assign_eps = hard, gumbel, 1.0

    def get_attn(self, attn: Tensor, gumbel=None, hard=None) -> Tensor:
        gumbel = self.gumbel if gumbel is None else gumbel
        hard = self.hard if hard is None else hard
        assert not (gumbel and self.training), "transcribed for eval mode"
        return hard_softmax(attn, dim=-2) if hard else F.softmax(attn, dim=-2)

    def forward(self, query: Tensor, key: Tensor, return_attn: bool = False):
        q, k, v = _heads(self.q_proj(query), 1), _heads(self.k_proj(key), 1), _heads(self.v_proj(key), 1)
        raw_attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.get_attn(raw_attn)
        attn_dict = None
        if return_attn:
            soft_attn = self.get_attn(raw_attn, gumbel=False, hard=False)
            attn_dict = {"hard": attn.clone(), "soft": 1. + F.softmax(soft_attn, dim=-1)}
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)
        return self.proj(_merge(attn @ v)), attn_dict


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_fuse: bool) -> None:
        super().__init__()
        self.num_heads, self.scale, self.qkv_fuse = num_heads, (dim // num_heads) ** -0.5, qkv_fuse
        if qkv_fuse:
            self.qkv = nn.Linear(dim, dim * 3)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor | None = None) -> Tensor:
        if self.qkv_fuse:
            B, N, C = query.shape
            qkv = self.qkv(query).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = _heads(self.q_proj(query), self.num_heads)
            k, v = _heads(self.k_proj(key), self.num_heads), _heads(self.v_proj(key), self.num_heads)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj(_merge(attn @ v))


class CrossAttnBlock(nn.Module):  # post_norm=True: no norm on query / key
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_post = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_fuse=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


class AttnBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_fuse=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # drop_path is the identity in eval
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GroupingBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_group_token: int, num_output_group: int, hard: bool,
                 gumbel: bool) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_token, int(0.5 * dim), num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads)
        self.assign = AssignAttention(dim, hard, gumbel)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(4.0 * dim), dim)
        self.reduction = nn.Identity()  # out_dim == dim

    def forward(self, x: Tensor, group_tokens: Tensor, return_attn: bool = False):
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        projected = self.norm_post_tokens(self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2))
        projected = self.pre_assign_attn(projected, x)
        new_x, attn_dict = self.assign(projected, x, return_attn=return_attn)
        new_x += projected
        return self.reduction(new_x) + self.mlp_channels(self.norm_new_x(new_x)), attn_dict


class ModalityTrans(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, num_classes: int, num_segments: int,
                 hard_assignment: bool, use_han: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([AttnBlock(dim, num_heads) for _ in range(depth)])
        self.num_group_token = num_classes
        self.han_encoder = GroupingBlock(dim, num_heads, num_segments, num_segments,  # official 8 = num_heads
                                         hard=not hard_assignment, gumbel=not hard_assignment) if use_han else None
        self.grouping = GroupingBlock(dim, num_heads, num_classes, num_classes, hard=hard_assignment,
                                      gumbel=hard_assignment)

    def forward(self, x: Tensor, group_token: Tensor, x_other: Tensor | None = None, return_attn: bool = False):
        group_token = group_token.expand(x.size(0), -1, -1)
        cat_x = torch.cat([x, group_token], dim=1)
        for blk in self.blocks:
            cat_x = blk(cat_x)
        x_attn, group_token = cat_x[:, :-self.num_group_token], cat_x[:, -self.num_group_token:]
        if self.han_encoder is not None and x_other is not None:
            x_attn, _ = self.han_encoder(x_attn, x_other)
        x, attn_dict = self.grouping(x_attn, group_token, return_attn=return_attn)
        return x, attn_dict, x_attn


class OfficialMGNHead(nn.Module):
    def __init__(self, visual_in: int, audio_in: int, st_in: int, dim: int, num_heads: int, depths: tuple[int, ...],
                 num_classes: int = 25, num_segments: int = 10, unimodal_assign: str = "soft",
                 crossmodal_assign: str = "soft") -> None:
        super().__init__()
        self.fc_a, self.fc_v = nn.Linear(audio_in, dim), nn.Linear(visual_in, dim)
        self.fc_st, self.fc_fusion = nn.Linear(st_in, dim), nn.Linear(dim * 2, dim)
        self.unimodal_assgin = unimodal_assign
        uni_hard, cross_hard = unimodal_assign == "hard", crossmodal_assign == "hard"
        self.audio_token = nn.Parameter(torch.zeros(num_classes, dim))
        self.visual_token = nn.Parameter(torch.zeros(num_classes, dim))
        self.audio_cug = ModalityTrans(dim, depths[0], num_heads, num_classes, num_segments, uni_hard, use_han=True)
        self.visual_cug = ModalityTrans(dim, depths[1], num_heads, num_classes, num_segments, uni_hard, use_han=False)
        self.av_mcg = ModalityTrans(dim, depths[2], num_heads, num_classes, num_segments, cross_hard, use_han=False)
        self.fc_prob, self.fc_prob_a, self.fc_prob_v = nn.Linear(dim, 1), nn.Linear(dim, 1), nn.Linear(dim, 1)
        self.fc_cls = nn.Linear(dim, num_classes)

    def forward(self, f_a: Tensor, f_v: Tensor, visual_st: Tensor):
        """f_a (1, B*T, Ca), f_v (1, B*T, Cv) as mgn.py:515-516 leaves them; visual_st (b, t, st)."""
        x1_0 = self.fc_a(f_a)
        x2_0 = self.fc_fusion(torch.cat((self.fc_v(f_v), self.fc_st(visual_st)), dim=-1))
        x2, attn_visual_dict, _ = self.visual_cug(x2_0, self.visual_token, return_attn=True)
        x1, attn_audio_dict, _ = self.audio_cug(x1_0, self.audio_token, x2_0, return_attn=True)
        x, _, _ = self.av_mcg(x1, x2, return_attn=True)
        global_prob = torch.sigmoid(self.fc_prob(x)).sum(dim=-1)
        aud_cls_prob, vis_cls_prob = self.fc_cls(self.audio_token), self.fc_cls(self.visual_token)
        attn_audio = attn_audio_dict[self.unimodal_assgin].squeeze(1)
        attn_visual = attn_visual_dict[self.unimodal_assgin].squeeze(1)
        a_prob = torch.sigmoid(self.fc_prob_a(x1))
        a_frame_prob = (a_prob * attn_audio).permute(0, 2, 1)
        v_prob = torch.sigmoid(self.fc_prob_v(x2))
        v_frame_prob = (v_prob * attn_visual).permute(0, 2, 1)
        return aud_cls_prob, vis_cls_prob, global_prob, a_prob.sum(-1), v_prob.sum(-1), a_frame_prob, v_frame_prob
