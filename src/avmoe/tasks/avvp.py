"""AVVP audio-visual video parsing on LLP: which of 25 events are heard and which are seen, in which 1-s segments,
learned from weak video-level labels (yingchengy/AVMOE ``AVMOE/AVVP/main.py`` + ``nets/mgn.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from avmoe.datamodules.batch import INDEX
from avmoe.datamodules.llp import LLP_CATEGORIES
from avmoe.metrics.avvp import AVVPMetric, avvp_predictions
from avmoe.models.config import AVMoEConfig
from avmoe.models.heads.avvp import AVVPHeadConfig, build_avvp_head
from avmoe.models.heads.unimodal import Readout
from avmoe.models.outputs import BackboneOutput
from avmoe.models.presets import paper_adapter
from avmoe.tasks.base import AVTask, Batch, OptimConfig, Outputs, UnimodalConfig, as_config, plain
from avmoe.tasks.predictions import event_runs

PROB_EPS = 1e-7


@dataclass
class AVVPLossConfig:
    """The official AVVP losses (AVMOE/AVVP ``main.py::train``)."""

    audio_smoothing: float = 1.0
    """Audio target ``a * y + (1 - a) / 2`` (1.0: none, as official)."""
    visual_smoothing: float = 0.9
    """Visual target ``v * y + (1 - v) / 2`` = ``0.9 y + 0.05`` officially (weak labels often miss in vision)."""
    class_token_weight: float = 1.0
    """Weight of the two class-token cross-entropies ``CE(fc_cls(tokens), arange(25))``."""


def clamped_bce(prob: Tensor, target: Tensor) -> Tensor:
    """``nn.BCELoss`` on probabilities clamped to [1e-7, 1 - 1e-7], as official, in float32 outside autocast
    (binary_cross_entropy refuses to autocast)."""
    with torch.autocast(device_type=prob.device.type, enabled=False):
        return F.binary_cross_entropy(prob.float().clamp(PROB_EPS, 1 - PROB_EPS), target.float())


def per_sample_bce(prob: Tensor, target: Tensor) -> Tensor:
    """Mean over classes of the clamped BCE, per sample. (B, C) -> (B,)."""
    with torch.autocast(device_type=prob.device.type, enabled=False):
        p = prob.float().clamp(PROB_EPS, 1 - PROB_EPS)
        return F.binary_cross_entropy(p, target.float(), reduction="none").mean(-1)


def default_backbone() -> AVMoEConfig:
    """Paper-scale backbone with the official AVVP adapters (param-free UA, 12 positions, no BN, LB x1.0)."""
    return AVMoEConfig(adapter=paper_adapter("avvp"))


class AVVPTask(AVTask):
    """AVMoE backbone + MGN head (or the MMIL baseline head) with the official AVVP losses and the official
    segment- and event-level F-scores.

    Training uses only the weak video-level ``labels``: BCE on the fused video-level probabilities, on the audio
    ones and on the label-smoothed visual ones, the class-token cross-entropies (MGN), plus the backbone's
    load-balancing loss (``backbone.adapter.load_balance_weight``, 1.0 officially; added by :class:`AVTask`).
    Validation and test score the dense ``gt_audio`` / ``gt_visual``; model selection uses segment-level
    Type@AV (``val/segment_type``), as ``main_avvp.py``.

    Args:
        backbone: AVMoE backbone configuration (encoders, adapters).
        head: head architecture (``mgn`` officially, ``mmil`` baseline) and sizes.
        loss: label smoothing and class-token loss weight.
        optim: optimizer and schedule (official: Adam 3e-4, StepLR(10, 0.1)).
        unimodal: uni-modal predictions for the balancing callbacks (zeroed features or auxiliary heads).
        crmt: not available (True raises ValueError): the head is not a linear fusion of per-modality
            features (``crmt_unsupported`` says why).
    """

    crmt_unsupported = (
        "AVVP's heads are not a linear fusion of per-modality features: MGN's video-level probabilities come from "
        "the audio class groups re-grouped by the visual ones (attention) and sigmoid(fc_prob(.)), the MMIL "
        "head's from HAN cross-attention and an input-dependent softmax over the two modalities; AVVP is also "
        "multi-label (one sigmoid per class), while CRMT's margin and certified bound are defined for one softmax "
        "class per sample."
    )
    monitor = "val/segment_type"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: AVMoEConfig = default_backbone(),
        head: AVVPHeadConfig = AVVPHeadConfig(),
        loss: AVVPLossConfig = AVVPLossConfig(),
        optim: OptimConfig = OptimConfig(lr=3e-4, step_size=10, gamma=0.1),
        unimodal: UnimodalConfig = UnimodalConfig(),
        crmt: bool = False,
    ) -> None:
        self.refuse_crmt(crmt)
        super().__init__(backbone=backbone, optim=optim, unimodal=unimodal)
        self.head_config = as_config(AVVPHeadConfig, head)
        self.loss_config = as_config(AVVPLossConfig, loss)
        dims = self.backbone.feature_dims
        self.head = build_avvp_head(dims["visual"], dims["audio"], self.head_config)
        self.register_buffer("class_ids", torch.arange(self.head_config.num_classes), persistent=False)
        self.build_unimodal_heads()
        self.save_hyperparameters(plain({"backbone": self.backbone_config, "head": self.head_config,
                                         "loss": self.loss_config, "optim": self.optim, "unimodal": self.unimodal}))

    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        return self.head(feats.visual, feats.audio, batch.get("visual_st"))

    # ---- auxiliary uni-modal heads ------------------------------------------------------------------------
    def make_unimodal_head(self, modality: str) -> nn.Module:
        """Video-level event logits from one modality's time-averaged features."""
        return Readout(self.backbone.feature_dims[modality], self.head_config.num_classes)

    def unimodal_head_forward(self, modality: str, feats: BackboneOutput, batch: Batch) -> Outputs:
        x = getattr(feats, modality).mean(1)  # (B, C)
        return {"global_prob": torch.sigmoid(self.unimodal_heads[modality](x))}  # type: ignore[index]

    def unimodal_sample_loss(self, modality: str, outputs: Outputs, batch: Batch) -> Tensor:
        """Clamped BCE against the weak labels, with the modality's own smoothing (visual 0.9 y + 0.05)."""
        smooth = self.loss_config.audio_smoothing if modality == "audio" else self.loss_config.visual_smoothing
        y = batch["labels"]
        return per_sample_bce(outputs["global_prob"], smooth * y + (1 - smooth) / 2)

    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        y = batch["labels"]  # (B, C) weak labels
        cfg = self.loss_config
        smooth_a, smooth_v = cfg.audio_smoothing, cfg.visual_smoothing  # target s * y + (1 - s) / 2
        losses = {
            "loss_global": clamped_bce(outputs["global_prob"], y),
            "loss_audio": clamped_bce(outputs["audio_prob"], smooth_a * y + (1 - smooth_a) / 2),
            "loss_visual": clamped_bce(outputs["visual_prob"], smooth_v * y + (1 - smooth_v) / 2),
        }
        if cfg.class_token_weight and "audio_cls_logits" in outputs:  # MGN only
            for side in ("audio", "visual"):
                ce = F.cross_entropy(outputs[f"{side}_cls_logits"].float(), self.class_ids)
                losses[f"loss_cls_{side}"] = cfg.class_token_weight * ce
        return losses

    def make_metric(self) -> Metric:
        return AVVPMetric()

    def update_metric(self, metric: Metric, outputs: Outputs, batch: Batch) -> None:
        if "gt_audio" not in batch or "gt_visual" not in batch:
            raise KeyError("AVVP evaluation needs dense 'gt_audio' and 'gt_visual' in the batch (val/test splits)")
        metric.update(batch[INDEX], outputs["global_prob"], outputs["audio_seg_prob"], outputs["visual_seg_prob"],
                      batch["gt_audio"], batch["gt_visual"])

    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        """``exp(-BCE)`` of the video-level probabilities against the weak labels (mean over classes), (B,)."""
        return torch.exp(-per_sample_bce(outputs["global_prob"], batch["labels"]))

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Jaccard index of the predicted (p >= 0.5) and the true video-level label sets (1 when both are empty)."""
        pred = outputs["global_prob"] >= 0.5
        true = batch["labels"] >= 0.5
        inter, union = (pred & true).sum(-1).float(), (pred | true).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

    prediction_name = "avvp"

    def predictions(self, batch: Batch, outputs: Outputs) -> dict[str, Any]:
        """Official binary parsing: audio/visual (B, C, T) predictions masked by the video-level ones."""
        audio, visual = avvp_predictions(outputs["global_prob"], outputs["audio_seg_prob"], outputs["visual_seg_prob"])
        return {INDEX: batch[INDEX], "filename": batch.get("filename"), "global_prob": outputs["global_prob"],
                "audio": audio, "visual": visual, "audio_prob": outputs["audio_seg_prob"],
                "visual_prob": outputs["visual_seg_prob"]}

    def prediction_records(self, batch: Batch, predictions: dict[str, Any]) -> list[dict[str, Any]]:
        """Per video: the predicted labels and the parsed events, ``{modality, event, onset, offset}`` in seconds
        (the layout of the release's ``AVVP_eval_audio.csv`` / ``AVVP_eval_visual.csv`` rows)."""
        names = self.class_names()
        files = predictions["filename"] or [None] * len(predictions[INDEX])
        records = []
        for i, index in enumerate(predictions[INDEX].tolist()):
            events = []
            for modality in ("audio", "visual"):
                seg_prob = predictions[f"{modality}_prob"][i].detach().float().cpu().numpy()  # (C, T)
                for c, active in enumerate(np.asarray(predictions[modality][i].cpu(), dtype=bool)):
                    events += [{"modality": modality, "event": names[c], "onset": onset, "offset": offset,
                                "score": round(float(seg_prob[c, onset:offset].mean()), 4)}
                               for onset, offset in event_runs(active)]
            global_prob = predictions["global_prob"][i].float().cpu()
            labels = (global_prob >= 0.5).nonzero().flatten().tolist()
            records.append({"index": int(index), "filename": files[i], "labels": [names[c] for c in labels],
                            "label_scores": {names[c]: round(float(global_prob[c]), 4) for c in labels},
                            "events": events})
        return records

    def name_details(self, details: dict[str, Any]) -> dict[str, Any]:
        names = self.class_names()
        return {k: {names[c]: v for c, v in d.items()} for k, d in details.items()}

    def class_names(self) -> list[str]:
        """LLP's 25 event names when the head has 25 classes, else ``class_<i>``."""
        n = self.head_config.num_classes
        return list(LLP_CATEGORIES) if n == len(LLP_CATEGORIES) else [f"class_{i}" for i in range(n)]

