"""Transcription of the official AVMoE AVS head (temporal attention, TPAVI, decoder), for equality tests only.

Written from yingchengy/AVMOE ``AVMOE/AVS/avs_scripts/avs_s4/model/PVT_AVSModel_v2.py`` (``RNNEncoder`` 40-53,
``InternalTemporalRelationModule`` 73-88, ``ResidualConvUnit`` 350-381, ``FeatureFusionBlock`` 383-413,
``Interpolate`` 416-445, ``TemporalAttention`` 448-583, ``Pred_endecoder.__init__`` 605-736 (head parts),
``tpavi_va`` 768-780, ``forward`` 884-945) and ``AVMOE/AVS/avs_scripts/avs_s4/model/TPAVI.py`` (``TPAVIModule``
6-153, mode ``dot``, 3-D, with BN); the MS3 file differs in the head only by ``gamma = opt.gamma``. Official
attribute names, so ``state_dict()`` has the official key layout. Hard-coded sizes (256 channels, 128 audio, 5
frames, 48/24/12/6 tap grids, 56/28/14/7 map sizes, 4 heads) are parameters here; the cross-modal decoders that
the official ``TemporalAttention`` computes and never uses are omitted (they do not affect any output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.official_ave import InternalTemporalRelationModule, RNNEncoder


class ResidualConvUnit(nn.Module):  # 350-381: the in-place ReLU also rectifies the caller's tensor
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(x)
        out = self.conv1(out)
        out = self.relu(out)
        out = self.conv2(out)
        return out + x


class FeatureFusionBlock(nn.Module):  # 383-413
    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, *xs: Tensor) -> Tensor:
        output = xs[0]
        if len(xs) == 2:
            output += self.resConfUnit1(xs[1])
        output = self.resConfUnit2(output)
        return F.interpolate(output, scale_factor=2, mode="bilinear", align_corners=True)


class TPAVIModule(nn.Module):  # TPAVI.py 6-153, mode="dot", dimension=3, bn_layer=True
    def __init__(self, in_channels: int, audio_dim: int) -> None:
        super().__init__()
        self.in_channels, self.inter_channels = in_channels, max(in_channels // 2, 1)
        self.align_channel = nn.Linear(audio_dim, in_channels)
        self.norm_layer = nn.LayerNorm(in_channels)
        self.g = nn.Conv3d(in_channels, self.inter_channels, kernel_size=1)
        self.W_z = nn.Sequential(nn.Conv3d(self.inter_channels, in_channels, kernel_size=1),
                                 nn.BatchNorm3d(in_channels))
        self.theta = nn.Conv3d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv3d(in_channels, self.inter_channels, kernel_size=1)

    def forward(self, x: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:  # (N, C, T, H, W), (N, T, A)
        batch_size = x.size(0)
        H, W = x.shape[-2], x.shape[-1]
        audio_temp = self.align_channel(audio)  # (N, T, C)
        audio = audio_temp.permute(0, 2, 1).unsqueeze(-1).unsqueeze(-1).repeat(1, 1, 1, H, W)
        g_x = self.g(x).view(batch_size, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(batch_size, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(audio).view(batch_size, self.inter_channels, -1)
        f = torch.matmul(theta_x, phi_x)  # (N, THW, THW)
        f_div_C = f / f.size(-1)
        y = torch.matmul(f_div_C, g_x).permute(0, 2, 1).contiguous()
        y = y.view(batch_size, self.inter_channels, *x.size()[2:])
        z = self.W_z(y) + x
        z = self.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return z, audio_temp


class TemporalAttention(nn.Module):  # 448-583 without the unused decoders
    def __init__(self, channels: int, audio_dim: int, d_model: int, ff: int, nhead: int, frames: int,
                 gamma: float) -> None:
        super().__init__()
        self.gamma, self.frames = gamma, frames
        self.v_fc = nn.ModuleList([nn.Linear(channels, channels) for _ in range(4)])
        self.relu, self.dropout = nn.ReLU(), nn.Dropout(0.2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.video_encoder = nn.ModuleList([InternalTemporalRelationModule(2 * d_model, d_model, ff, nhead)
                                            for _ in range(4)])
        self.audio_encoder = nn.ModuleList([InternalTemporalRelationModule(d_model, d_model, ff, nhead)
                                            for _ in range(4)])
        self.audio_visual_rnn_layer = nn.ModuleList([RNNEncoder(audio_dim, channels, d_model) for _ in range(4)])
        self.audio_gated = nn.ModuleList([nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid()) for _ in range(4)])
        self.video_gated = nn.ModuleList([nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid()) for _ in range(4)])

    def forward(self, visual_feature_list: list[Tensor], audio_feature: Tensor) -> tuple[list[Tensor], Tensor]:
        bs, t = audio_feature.size(0), self.frames
        pooled = [self.avgpool(x).squeeze().view(bs, t, -1) for x in visual_feature_list]
        audio_rnn_input = audio_feature
        audio_feature = audio_feature.view(-1, audio_feature.size(-1))
        pooled = [self.dropout(self.relu(self.v_fc[i](x))) for i, x in enumerate(pooled)]
        outs, video_gates = [], []
        for i, x in enumerate(visual_feature_list):
            audio_rnn_output, visual_rnn_output = self.audio_visual_rnn_layer[i](audio_rnn_input, pooled[i])
            audio_encoder_input = audio_rnn_output.transpose(1, 0).contiguous()  # (T, B, d)
            visual_encoder_input = visual_rnn_output.transpose(1, 0).contiguous()  # (T, B, 2d)
            video_key_value_feature = self.video_encoder[i](visual_encoder_input)
            audio_key_value_feature = self.audio_encoder[i](audio_encoder_input)
            audio_gate = self.audio_gated[i](audio_key_value_feature).transpose(1, 0).reshape(bs * t, 1, 1, 1)
            video_gates.append(self.video_gated[i](video_key_value_feature).transpose(1, 0).reshape(bs * t, 1))
            outs.append(x + audio_gate * x * self.gamma)
        video_gate = (video_gates[0] + video_gates[1] + video_gates[2] + video_gates[3]) / 4
        return outs, audio_feature + video_gate * audio_feature * self.gamma


class OfficialAVSHead(nn.Module):
    """The head part of ``Pred_endecoder``: taps from ``multi_scale``, audio from the pooled HTS-AT tokens."""

    def __init__(self, stage_dims: list[int], audio_in: int, channels: int, audio_dim: int, d_model: int, ff: int,
                 nhead: int, frames: int, grids: list[int], map_sizes: list[int], gamma: float) -> None:
        super().__init__()
        self.frames, self.grids, self.map_sizes = frames, grids, map_sizes
        for i, dim in enumerate(stage_dims):
            setattr(self, f"x{i + 1}_linear_", nn.Linear(dim, channels))
        self.audio_linear = nn.Linear(audio_in, audio_dim)
        self.temporal_attn = TemporalAttention(channels, audio_dim, d_model, ff, nhead, frames, gamma)
        for i in range(4):
            setattr(self, f"tpavi_b{i + 1}", TPAVIModule(channels, audio_dim))
        self.path4, self.path3 = FeatureFusionBlock(channels), FeatureFusionBlock(channels)
        self.path2, self.path1 = FeatureFusionBlock(channels), FeatureFusionBlock(channels)
        self.output_conv = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=3, stride=1, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),  # Interpolate(scale_factor=2, mode="bilinear")
            nn.Conv2d(128, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
        )

    def tpavi_va(self, x: Tensor, audio: Tensor, stage: int) -> tuple[Tensor, Tensor]:  # 768-780
        tpavi_b = getattr(self, f"tpavi_b{stage + 1}")
        audio = audio.view(-1, self.frames, audio.shape[-1])
        _, C, H, W = x.shape
        x = x.reshape(-1, self.frames, C, H, W).permute(0, 2, 1, 3, 4).contiguous()  # pre_reshape_for_tpavi
        x, a = tpavi_b(x, audio)
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, C, H, W)  # post_reshape_for_tpavi (view on a permuted tensor)
        return x, a

    def forward(self, multi_scale: list[Tensor], f_a_mean: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        audio_feature = self.audio_linear(f_a_mean)  # (B, T, audio_dim)
        xs = []
        for i, tokens in enumerate(multi_scale):  # (BF, N_s, C_s)
            g = self.grids[i]
            x = getattr(self, f"x{i + 1}_linear_")(tokens.view(tokens.size(0), g, g, -1))
            size = self.map_sizes[i]
            xs.append(F.interpolate(x.permute(0, 3, 1, 2), mode="bicubic", size=[size, size]))
        feature_map_list, audio_feature = self.temporal_attn(xs, audio_feature)
        a_fea_list = [None] * 4
        for i in range(4):  # tpavi_stages = [0, 1, 2, 3], tpavi_va_flag only
            conv_feat = torch.zeros_like(feature_map_list[i])
            conv_feat_va, a_fea = self.tpavi_va(feature_map_list[i], audio_feature, stage=i)
            conv_feat += conv_feat_va
            a_fea_list[i] = a_fea
            feature_map_list[i] = conv_feat / 1
        conv4_feat = self.path4(feature_map_list[3])
        conv43 = self.path3(conv4_feat, feature_map_list[2])
        conv432 = self.path2(conv43, feature_map_list[1])
        conv4321 = self.path1(conv432, feature_map_list[0])
        return self.output_conv(conv4321), feature_map_list, a_fea_list


# ---- losses: AVMOE/AVS/avs_scripts/avs_s4/loss.py and avs_ms3/loss.py (the AVSBench loss.py files) ------------------
def F1_IoU_BCELoss(pred_masks: Tensor, first_gt_mask: Tensor) -> Tensor:  # avs_s4/loss.py 7-26 (no .cuda())
    assert len(pred_masks.shape) == 4
    pred_masks = torch.sigmoid(pred_masks)  # [bs*5, 1, 224, 224]
    indices = torch.tensor(list(range(0, len(pred_masks), 5)))
    first_pred = torch.index_select(pred_masks, dim=0, index=indices)  # [bs, 1, 224, 224]
    if len(first_gt_mask.shape) == 5:
        first_gt_mask = first_gt_mask.squeeze(1)  # [bs, 1, 224, 224]
    return nn.BCELoss()(first_pred, first_gt_mask)


def F5_IoU_BCELoss(pred_mask: Tensor, five_gt_masks: Tensor) -> Tensor:  # avs_ms3/loss.py 7-20
    assert len(pred_mask.shape) == 4
    pred_mask = torch.sigmoid(pred_mask)
    return nn.BCELoss()(pred_mask, five_gt_masks)


def A_MaskedV_SimmLoss_ms3(pred_masks: Tensor, a_fea_list: list[Tensor], v_map_list: list[Tensor],
                           count_stages: list[int], mask_pooling_type: str = "avg", norm_fea: bool = True,
                           threshold: bool = False, euclidean_flag: bool = False, kl_flag: bool = False
                           ) -> Tensor:  # avs_ms3/loss.py 23-73
    assert len(pred_masks.shape) == 4
    total_loss = 0
    for stage in count_stages:
        a_fea, v_map = a_fea_list[stage], v_map_list[stage]
        a_fea = a_fea.view(-1, a_fea.shape[-1])
        C, H, W = v_map.shape[1], v_map.shape[-2], v_map.shape[-1]
        assert C == a_fea.shape[-1]
        if mask_pooling_type == "avg":
            downsample_pred_masks = nn.AdaptiveAvgPool2d((H, W))(pred_masks)
        elif mask_pooling_type == "max":
            downsample_pred_masks = nn.AdaptiveMaxPool2d((H, W))(pred_masks)
        downsample_pred_masks = torch.sigmoid(downsample_pred_masks)
        if threshold:
            downsample_pred_masks = (downsample_pred_masks > 0.5).float()
            obj_pixel_num = downsample_pred_masks.sum(-1).sum(-1)
            masked_v_map = torch.mul(v_map, downsample_pred_masks)
            masked_v_fea = masked_v_map.sum(-1).sum(-1) / (obj_pixel_num + 1e-6)
        else:
            masked_v_map = torch.mul(v_map, downsample_pred_masks)
            masked_v_fea = masked_v_map.mean(-1).mean(-1)
        if norm_fea:
            a_fea = F.normalize(a_fea, dim=-1)
            masked_v_fea = F.normalize(masked_v_fea, dim=-1)
        if euclidean_flag:
            loss = F.pairwise_distance(a_fea, masked_v_fea, p=2).mean()
        elif kl_flag:
            loss = F.kl_div(masked_v_fea.softmax(dim=-1).log(), a_fea.softmax(dim=-1), reduction="sum")
        total_loss += loss
    total_loss /= len(count_stages)
    return total_loss


def IouSemanticAwareLoss_ms3(pred_masks: Tensor, gt_mask: Tensor, a_fea_list: list[Tensor], v_map_list: list[Tensor],
                             sa_loss_flag: bool = False, count_stages: list[int] = [], lambda_1: float = 0,
                             mask_pooling_type: str = "avg", norm_fea: bool = True, threshold: bool = False,
                             kl_flag: bool = False) -> Tensor:  # avs_ms3/loss.py 133-166 (closer_flag False)
    total_loss = F5_IoU_BCELoss(pred_masks, gt_mask)
    if sa_loss_flag:
        masked_av_loss = A_MaskedV_SimmLoss_ms3(pred_masks, a_fea_list, v_map_list, count_stages, mask_pooling_type,
                                                norm_fea, threshold, False, kl_flag)
        total_loss = total_loss + lambda_1 * masked_av_loss
    return total_loss
