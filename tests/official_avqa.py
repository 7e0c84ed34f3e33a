"""Transcription of the official AVMoE AVQA head, for equality tests only.

Written from yingchengy/AVMOE ``AVMOE/AVQA/net_grd_avst/net_avst_v2.py`` (``QstEncoder`` 419-440,
``AVQA_Fusion_Net.__init__`` 451-492 (head layers), ``forward`` 716-831 from the final Swin tokens on), with the
official attribute names so that ``state_dict()`` has the official key layout. Hard-coded sizes (1536 width, 768
audio, 93 question words, 6x6 tokens, 4 heads, ``avqa_fc_class`` answers) are parameters here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QstEncoder(nn.Module):  # 419-440
    def __init__(self, qst_vocab_size: int, word_embed_size: int, embed_size: int, num_layers: int,
                 hidden_size: int) -> None:
        super().__init__()
        self.word2vec = nn.Embedding(qst_vocab_size, word_embed_size)
        self.tanh = nn.Tanh()
        self.lstm = nn.LSTM(word_embed_size, hidden_size, num_layers)
        self.fc = nn.Linear(2 * num_layers * hidden_size, embed_size)

    def forward(self, question: Tensor) -> Tensor:
        qst_vec = self.tanh(self.word2vec(question)).transpose(0, 1)
        _, (hidden, cell) = self.lstm(qst_vec)
        qst_feature = torch.cat((hidden, cell), 2).transpose(0, 1)
        qst_feature = qst_feature.reshape(qst_feature.size()[0], -1)
        return self.fc(self.tanh(qst_feature))


class OfficialAVQAHead(nn.Module):
    def __init__(self, d: int, audio_in: int, vocab: int, num_classes: int, heads: int, grid: int) -> None:
        super().__init__()
        self.d, self.grid = d, grid
        self.fc_a1, self.fc_a2 = nn.Linear(audio_in, d), nn.Linear(d, d)
        self.fc_a1_pure, self.fc_a2_pure = nn.Linear(audio_in, d), nn.Linear(d, d)  # built, never used
        self.fc_fusion = nn.Linear(d + d, d)
        self.linear11, self.dropout1, self.linear12 = nn.Linear(d, d), nn.Dropout(0.1), nn.Linear(d, d)
        self.linear21, self.dropout2, self.linear22 = nn.Linear(d, d), nn.Dropout(0.1), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout3, self.dropout4 = nn.Dropout(0.1), nn.Dropout(0.1)
        self.norm3 = nn.LayerNorm(d)  # built, never used
        self.attn_a = nn.MultiheadAttention(d, heads, dropout=0.1)
        self.attn_v = nn.MultiheadAttention(d, heads, dropout=0.1)
        self.question_encoder = QstEncoder(vocab, d, d, 1, d)
        self.tanh = nn.Tanh()
        self.fc_ans = nn.Linear(d, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc_gl = nn.Linear(d + d, d)
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(d + d, 512), nn.Linear(512, 256), nn.Linear(256, 128), \
            nn.Linear(128, 2)

    def _ground(self, visual: Tensor, audio_feat_aa: Tensor) -> Tensor:  # 738-760 (posi) / 771-789 (nega)
        B, T, C, H, W = visual.size()
        temp_visual = visual.reshape(B * T, C, H, W)  # .view in the official (its tensor is contiguous)
        visual_feat_before_grounding = self.avgpool(temp_visual).squeeze()
        (B, C, H, W) = temp_visual.size()
        v_feat = temp_visual.view(B, C, H * W).permute(0, 2, 1)
        visual_feat = nn.functional.normalize(v_feat, dim=2)
        x2_va = torch.matmul(visual_feat, audio_feat_aa).squeeze()
        x2_p = F.softmax(x2_va, dim=-1).unsqueeze(-2)
        visual_feat_grd_after_grounding = torch.matmul(x2_p, visual_feat).squeeze()
        visual_gl = torch.cat((visual_feat_before_grounding, visual_feat_grd_after_grounding), dim=-1)
        return self.fc_gl(self.tanh(visual_gl))

    def _match(self, audio_feat: Tensor, visual_feat_grd: Tensor) -> Tensor:  # 762-767
        feat = torch.cat((audio_feat, visual_feat_grd), dim=-1)
        feat = F.relu(self.fc1(feat))
        feat = F.relu(self.fc2(feat))
        feat = F.relu(self.fc3(feat))
        return self.fc4(feat)

    def forward(self, f_v: Tensor, f_v_nega: Tensor, f_a_mean: Tensor, question: Tensor, bs: int, t: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        """f_v / f_v_nega ((b t), (h w), c) final tokens, f_a_mean ((b t), c_a), question (b, L)."""
        g = self.grid
        # rearrange '(b t) (h w) c -> b t c h w' and '(b t) c -> b t c' (716-721)
        visual_posi = f_v.reshape(bs, t, g, g, -1).permute(0, 1, 4, 2, 3)
        visual_nega = f_v_nega.reshape(bs, t, g, g, -1).permute(0, 1, 4, 2, 3)
        audio = f_a_mean.reshape(bs, t, -1)
        qst_feature = self.question_encoder(question)
        xq = qst_feature.unsqueeze(0)
        audio_feat = self.fc_a2(F.relu(self.fc_a1(audio)))
        audio_feat_pure = audio_feat
        B, T, C = audio_feat.size()
        audio_feat = audio_feat.view(B * T, C)
        audio_feat_aa = nn.functional.normalize(audio_feat.unsqueeze(-1), dim=1)
        visual_feat_grd_posi = self._ground(visual_posi, audio_feat_aa)
        out_match_posi = self._match(audio_feat, visual_feat_grd_posi)
        out_match_nega = self._match(audio_feat, self._ground(visual_nega, audio_feat_aa))
        B = xq.shape[1]
        visual_feat_grd_be = visual_feat_grd_posi.view(B, -1, self.d)
        visual_feat_grd = visual_feat_grd_be.permute(1, 0, 2)
        visual_feat_att = self.attn_v(xq, visual_feat_grd, visual_feat_grd)[0].squeeze(0)
        src = self.linear12(self.dropout1(F.relu(self.linear11(visual_feat_att))))
        visual_feat_att = self.norm1(visual_feat_att + self.dropout2(src))
        audio_feat_be = audio_feat_pure.view(B, -1, self.d)
        audio_feat = audio_feat_be.permute(1, 0, 2)
        audio_feat_att = self.attn_a(xq, audio_feat, audio_feat)[0].squeeze(0)
        src = self.linear22(self.dropout3(F.relu(self.linear21(audio_feat_att))))
        audio_feat_att = self.norm2(audio_feat_att + self.dropout4(src))
        feat = torch.cat((audio_feat_att + audio_feat_be.mean(dim=-2).squeeze(),
                          visual_feat_att + visual_feat_grd_be.mean(dim=-2).squeeze()), dim=-1)
        feat = self.fc_fusion(self.tanh(feat))
        out_qa = self.fc_ans(self.tanh(torch.mul(feat, qst_feature)))
        return out_qa, out_match_posi, out_match_nega
