"""Transcription of the official AVMoE AVE head (CMBS temporal attention) and losses, for equality tests only.

Written from yingchengy/AVMOE ``AVMOE/AVE/nets/models.py`` (``Encoder`` 14-42, ``Decoder`` 45-71, ``EncoderLayer``
74-113, ``DecoderLayer`` 116-157) and ``AVMOE/AVE/nets/net_trans_v3.py`` (``RNNEncoder`` 42-55,
``InternalTemporalRelationModule`` 58-73, ``CrossModalRelationAttModule`` 76-90, ``SupvLocalizeModule`` 113-135,
``TemporalAttention`` 180-253, ``CMBS`` 256-293 with ``is_inter_in_cmbs=0`` as in ``AVMOE/AVE/train.sh``), with the
official attribute names so that ``state_dict()`` has the official key layout. The hard-coded widths (512, 128, 256,
1024, 4 heads, 1536 / 768 inputs) are parameters here so the test runs at tiny sizes; the official relations between
them (visual RNN hidden = d_model, audio RNN hidden = d_model / 2, video encoder input = 2 * d_model) are kept.
Sequence-first layout (T, B, C) as in the official code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EncoderLayer(nn.Module):  # models.py:74-113
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor) -> Tensor:
        src2 = self.self_attn(src, src, src)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class DecoderLayer(nn.Module):  # models.py:116-157: self_attn is built and never called
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        memory = torch.cat([memory, tgt], dim=0)
        tgt2 = self.multihead_attn(tgt, memory, memory)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm2(tgt + self.dropout2(tgt2))


class Stack(nn.Module):  # models.py Encoder / Decoder (norm=None): deep copies of the template layer
    def __init__(self, layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, x: Tensor, *memory: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, *memory)
        return x


class InternalTemporalRelationModule(nn.Module):  # net_trans_v3.py:58-73
    def __init__(self, input_dim: int, d_model: int, feedforward_dim: int, nhead: int) -> None:
        super().__init__()
        self.encoder_layer = EncoderLayer(d_model, nhead, feedforward_dim)  # registered, so in the state dict
        self.encoder = Stack(self.encoder_layer, 2)
        self.affine_matrix = nn.Linear(input_dim, d_model)

    def forward(self, feature: Tensor) -> Tensor:
        return self.encoder(self.affine_matrix(feature))


class CrossModalRelationAttModule(nn.Module):  # net_trans_v3.py:76-90
    def __init__(self, input_dim: int, d_model: int, feedforward_dim: int, nhead: int) -> None:
        super().__init__()
        self.decoder_layer = DecoderLayer(d_model, nhead, feedforward_dim)
        self.decoder = Stack(self.decoder_layer, 1)
        self.affine_matrix = nn.Linear(input_dim, d_model)

    def forward(self, query_feature: Tensor, memory_feature: Tensor) -> Tensor:
        return self.decoder(self.affine_matrix(query_feature), memory_feature)


class RNNEncoder(nn.Module):  # net_trans_v3.py:42-55 (dropout=0.2 has no effect with one layer)
    def __init__(self, audio_dim: int, video_dim: int, d_model: int) -> None:
        super().__init__()
        self.audio_rnn = nn.LSTM(audio_dim, d_model // 2, num_layers=1, batch_first=True, bidirectional=True)
        self.visual_rnn = nn.LSTM(video_dim, d_model, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, audio_feature: Tensor, visual_feature: Tensor) -> tuple[Tensor, Tensor]:
        return self.audio_rnn(audio_feature)[0], self.visual_rnn(visual_feature)[0]


class TemporalAttention(nn.Module):  # net_trans_v3.py:180-253
    def __init__(self, visual_in: int, audio_in: int, video_dim: int, audio_dim: int, d_model: int, ff: int,
                 nhead: int) -> None:
        super().__init__()
        self.v_fc = nn.Linear(visual_in, video_dim)
        self.a_fc = nn.Linear(audio_in, audio_dim)
        self.relu, self.dropout = nn.ReLU(), nn.Dropout(0.2)
        self.video_encoder = InternalTemporalRelationModule(video_dim, d_model, ff, nhead)
        self.video_decoder = CrossModalRelationAttModule(video_dim, d_model, ff, nhead)
        self.audio_encoder = InternalTemporalRelationModule(d_model, d_model, ff, nhead)
        self.audio_decoder = CrossModalRelationAttModule(d_model, d_model, ff, nhead)
        self.audio_visual_rnn_layer = RNNEncoder(audio_dim, video_dim, d_model)
        self.audio_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())
        self.gamma = 0.1

    def forward(self, visual_feature: Tensor, audio_feature: Tensor) -> tuple[Tensor, Tensor]:
        audio_rnn_input = self.a_fc(audio_feature)
        visual_rnn_input = self.dropout(self.relu(self.v_fc(visual_feature)))
        audio_rnn_output1, visual_rnn_output1 = self.audio_visual_rnn_layer(audio_rnn_input, visual_rnn_input)
        audio_encoder_input1 = audio_rnn_output1.transpose(1, 0).contiguous()  # (T, B, d)
        visual_encoder_input1 = visual_rnn_output1.transpose(1, 0).contiguous()  # (T, B, 2d)
        video_key_value_feature = self.video_encoder(visual_encoder_input1)
        audio_query_output = self.audio_decoder(audio_encoder_input1, video_key_value_feature)
        audio_key_value_feature = self.audio_encoder(audio_encoder_input1)
        video_query_output = self.video_decoder(visual_encoder_input1, audio_key_value_feature)
        audio_gate = self.audio_gated(audio_key_value_feature)
        video_gate = self.video_gated(video_key_value_feature)
        video_query_output = video_query_output + audio_gate * video_query_output * self.gamma
        audio_query_output = audio_query_output + video_gate * audio_query_output * self.gamma
        return video_query_output, audio_query_output


class SupvLocalizeModule(nn.Module):  # net_trans_v3.py:113-135
    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, num_classes)

    def forward(self, fused_content: Tensor) -> tuple[Tensor, Tensor]:
        max_fused_content, _ = fused_content.transpose(1, 0).max(1)
        return self.classifier(fused_content), self.event_classifier(max_fused_content)


class CMBS(nn.Module):  # net_trans_v3.py:256-293, is_inter_in_cmbs=0
    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.localize_module = SupvLocalizeModule(d_model, num_classes)
        self.audio_cas = nn.Linear(d_model, num_classes)
        self.video_cas = nn.Linear(d_model, num_classes)
        self.gamma = 0.3

    def forward(self, visual_feature: Tensor, audio_feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        video_cas = self.video_cas(visual_feature).permute(1, 0, 2)  # (B, T, C)
        audio_cas = self.audio_cas(audio_feature).permute(1, 0, 2)
        score_video = video_cas.sort(descending=True, dim=1)[0][:, :4, :].mean(dim=1)
        score_audio = audio_cas.sort(descending=True, dim=1)[0][:, :4, :].mean(dim=1)
        av_score = (score_video + score_audio) / 2
        is_event_scores, event_scores = self.localize_module((visual_feature + audio_feature) / 2)
        return is_event_scores, event_scores + self.gamma * av_score, av_score


class OfficialAVEHead(nn.Module):
    """``MMIL_Net``'s head part: ``temporal_attn`` then ``CMBS`` (net_trans_v3.py:736-749), pooled features in."""

    def __init__(self, visual_in: int, audio_in: int, video_dim: int, audio_dim: int, d_model: int, ff: int,
                 nhead: int, num_classes: int = 28) -> None:
        super().__init__()
        self.temporal_attn = TemporalAttention(visual_in, audio_in, video_dim, audio_dim, d_model, ff, nhead)
        self.CMBS = CMBS(d_model, num_classes)

    def forward(self, f_v: Tensor, f_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # (B, T, Cv), (B, T, Ca)
        visual_feature, audio_feature = self.temporal_attn(f_v, f_a)
        is_event_scores, event_scores, av_score = self.CMBS(visual_feature, audio_feature)
        # main_trans_v3.py:110: (T, B, 1) -> (B, T)
        return is_event_scores.transpose(1, 0).squeeze(-1).contiguous(), event_scores, av_score


def official_ave_loss(is_event_scores: Tensor, event_scores: Tensor, av_score: Tensor, labels: Tensor) -> Tensor:
    """main_trans_v3.py:116-128; labels (B, T, 29) one-hot with background last."""
    labels_foreground = labels[:, :, :-1]
    labels_bce, labels_evn = labels_foreground.max(-1)
    labels_event, _ = labels_evn.max(-1)
    loss_is_event = nn.BCEWithLogitsLoss()(is_event_scores, labels_bce)
    loss_cas = nn.CrossEntropyLoss()(av_score, labels_event)
    loss_event_class = nn.CrossEntropyLoss()(event_scores, labels_event)
    return loss_is_event + loss_event_class + loss_cas


class ExpertAdapter(nn.Module):
    """net_trans_v3.py:296-435, ``adapter_kind="bottleneck"`` with ``is_before_layernorm=1``,
    ``is_post_layernorm=1``, ``is_self_attention=0`` (``AVMOE/AVE/train.sh``); ``uni`` adds the other tasks'
    unimodal experts (``AVMOE/AVVP/nets/mgn.py`` ``ExpertAdapter``, ``AVMOE/AVS/avs_scripts/avs_s4/model/
    PVT_AVSModel_v2.py`` ``ExpertAdapter``)."""

    def __init__(self, input_dim: int, output_dim: int, reduction_factor: int, num_conv_group: int, use_bn: bool,
                 use_gate: bool, num_tk: int, is_multimodal: bool, uni: str = "linear") -> None:
        super().__init__()
        self.use_bn, self.is_multimodal, self.uni = use_bn, is_multimodal, uni
        self.gate = nn.Parameter(torch.zeros(1)) if use_gate else None
        down = input_dim // reduction_factor
        if is_multimodal:
            self.my_tokens = nn.Parameter(torch.rand((num_tk, input_dim)))
            self.gate_av = nn.Parameter(torch.zeros(1))
        elif uni == "param_free":  # AVMOE/AVVP/nets/mgn.py:81-83
            self.gate_av = nn.Parameter(torch.zeros(1))
        elif uni == "mha":  # AVS PVT_AVSModel_v2.py:140-142 (self_attention_version v1)
            self.self_attention = nn.MultiheadAttention(input_dim, num_heads=4, dropout=0.2)
        elif uni == "latent":  # AVS PVT_AVSModel_v2.py:143-145 (self_attention_version v2)
            self.my_tokens = nn.Parameter(torch.rand((num_tk, input_dim)))
            self.gate_self = nn.Parameter(torch.zeros(1))
        self.down_sampler = nn.Conv2d(input_dim, down, 1, groups=num_conv_group, bias=False)
        self.up_sampler = nn.Conv2d(down, output_dim, 1, groups=num_conv_group, bias=False)
        if use_bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(down), nn.BatchNorm2d(output_dim)
        self.ln_before, self.ln_post = nn.LayerNorm(output_dim), nn.LayerNorm(output_dim)

    def forward(self, x: Tensor, vis_token: Tensor) -> Tensor:  # (M, C, N, 1), (M, C, N, 1)
        if self.is_multimodal:
            rep_token = self.my_tokens.expand(x.size(0), -1, -1)
            att_v2tk = F.softmax(torch.bmm(rep_token, vis_token.squeeze(-1)), dim=-1)
            rep_token = rep_token + torch.bmm(att_v2tk, vis_token.squeeze(-1).permute(0, 2, 1))
            att_tk2x = F.softmax(torch.bmm(x.squeeze(-1).permute(0, 2, 1), rep_token.permute(0, 2, 1)), dim=-1)
            x_res = torch.bmm(att_tk2x, rep_token).permute(0, 2, 1).unsqueeze(-1)
            x = x + self.gate_av * x_res.contiguous()
        elif self.uni == "param_free":  # mgn.py:134-139
            x_squ = x.squeeze(-1)
            att_tk2x = F.softmax(torch.bmm(x_squ.permute(0, 2, 1), x_squ), dim=-1)
            x = x + self.gate_av * torch.bmm(x_squ, att_tk2x).unsqueeze(-1).contiguous()
        elif self.uni == "mha":  # PVT_AVSModel_v2.py:211-214: sequence axis = frames (M), as nn.MHA is seq-first
            x = x.squeeze(-1).permute(0, 2, 1)
            x, _ = self.self_attention(x, x, x)
            x = x.permute(0, 2, 1).unsqueeze(-1)
        elif self.uni == "latent":  # PVT_AVSModel_v2.py:215-227
            rep_token = self.my_tokens.expand(x.size(0), -1, -1)
            att_v2tk = F.softmax(torch.bmm(rep_token, x.squeeze(-1)), dim=-1)
            rep_token = rep_token + torch.bmm(att_v2tk, x.squeeze(-1).permute(0, 2, 1))
            att_tk2x = F.softmax(torch.bmm(x.squeeze(-1).permute(0, 2, 1), rep_token.permute(0, 2, 1)), dim=-1)
            x = x + self.gate_self * torch.bmm(att_tk2x, rep_token).permute(0, 2, 1).unsqueeze(-1).contiguous()
        x = self.ln_before(x.squeeze(-1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(-1)
        z = self.down_sampler(x)
        if self.use_bn:
            z = self.bn1(z)
        if self.is_multimodal:  # the unimodal expert has no activation (net_trans_v3.py:416-422)
            z = F.relu(z)
        output = self.up_sampler(z)
        if self.use_bn:
            output = self.bn2(output)
        output = self.ln_post(output.squeeze(-1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(-1)
        return output if self.gate is None else self.gate * output


class MoEAdapter(nn.Module):  # net_trans_v3.py:438-487
    def __init__(self, input_dim: int, reduction_factor: int, num_conv_group: int, use_bn: bool, use_gate: bool,
                 num_tk: int, conv_dim_in: int, conv_dim_out: int, linear_in: int, linear_out: int,
                 num_multimodal_experts: int = 1, num_singlemodal_experts: int = 1, uni: str = "linear") -> None:
        super().__init__()
        self.conv_adapter = nn.Conv2d(conv_dim_in, conv_dim_out, kernel_size=1)
        self.fc = nn.Linear(linear_in, linear_out)
        args = (input_dim, input_dim, reduction_factor, num_conv_group, use_bn, use_gate, num_tk)
        self.multimodal_experts = nn.ModuleList([ExpertAdapter(*args, is_multimodal=True)
                                                 for _ in range(num_multimodal_experts)])
        self.singlemodal_experts = nn.ModuleList([ExpertAdapter(*args, is_multimodal=False, uni=uni)
                                                  for _ in range(num_singlemodal_experts)])
        self.router = nn.Sequential(nn.Linear(input_dim + linear_out, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                                    nn.Linear(32, num_multimodal_experts + num_singlemodal_experts))

    def forward(self, x: Tensor, vis_token: Tensor) -> tuple[Tensor, Tensor]:  # (M, C, N, 1), (M, C', N', 1)
        vis_token = self.conv_adapter(vis_token.transpose(2, 1))
        vis_token_fc = self.fc(vis_token.squeeze(-1))
        vis_token = vis_token_fc.permute(0, 2, 1).unsqueeze(-1)
        modal_1 = x.squeeze(-1).permute(0, 2, 1).mean(dim=1, keepdim=True)
        modal_2 = vis_token_fc.mean(dim=1, keepdim=True)
        gating_probs = F.softmax(self.router(torch.cat((modal_1, modal_2), dim=-1)), dim=-1)
        outs = torch.concat([e(x, vis_token) for e in [*self.multimodal_experts, *self.singlemodal_experts]], dim=-1)
        return (outs * gating_probs.unsqueeze(-2)).sum(dim=-1, keepdim=True), gating_probs
