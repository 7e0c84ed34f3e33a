"""AVE event localization: which of 28 events (or background) each 1-s segment shows and sounds."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from avmoe.datamodules.ave import AVE_CATEGORIES
from avmoe.datamodules.batch import INDEX
from avmoe.metrics.ave import BACKGROUND, AVESegmentAccuracy, ave_segment_predictions
from avmoe.models.config import AVMoEConfig
from avmoe.models.heads.ave import AVEHead, AVEHeadConfig
from avmoe.models.heads.unimodal import Readout
from avmoe.models.outputs import BackboneOutput
from avmoe.tasks.base import AVTask, Batch, OptimConfig, Outputs, UnimodalConfig, as_config, plain


def video_class(label: Tensor, background: int = BACKGROUND) -> tuple[Tensor, Tensor]:
    """Video-level event class and whether the clip has any event. label (B, T) -> (B,), (B,) bool.

    The official code (``AVMOE/AVE/main_trans_v3.py``, ``train``) takes the max over time of the per-segment
    argmax of the 28 foreground columns, which gives class 0 to clips without any event (one AVE row is all
    background); ``cls`` is that same class (0 for those clips), ``has_event`` says which clips have one.
    """
    foreground = label != background  # (B, T)
    cls = torch.where(foreground, label, torch.full_like(label, -1)).max(dim=1).values
    return cls.clamp(min=0), foreground.any(dim=1)


class AVETask(AVTask):
    """AVMoE backbone + CMBS temporal-attention head with the official AVE losses and segment accuracy.

    Args:
        backbone: AVMoE backbone configuration (encoders, adapters).
        head: temporal-attention head sizes.
        optim: optimizer and schedule.
        unimodal: uni-modal predictions for the balancing callbacks (zeroed features or auxiliary heads).
        background_clips: how clips without any event enter ``loss_class`` / ``loss_av``. ``exclude`` (default):
            their terms are masked out (mean over the clips with an event; 0, still attached to the graph, when a
            batch has none, so every batch logs the same three terms and every head parameter gets a gradient).
            ``official``: they count with video class 0, as ``AVMOE/AVE/main_trans_v3.py`` does.
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: AVMoEConfig = AVMoEConfig(),
        head: AVEHeadConfig = AVEHeadConfig(),
        optim: OptimConfig = OptimConfig(),
        unimodal: UnimodalConfig = UnimodalConfig(),
        background_clips: Literal["exclude", "official"] = "exclude",
    ) -> None:
        super().__init__(backbone=backbone, optim=optim, unimodal=unimodal)
        if background_clips not in ("exclude", "official"):
            raise ValueError(f"background_clips must be 'exclude' or 'official', got {background_clips!r}")
        self.background_clips = background_clips
        self.head_config = as_config(AVEHeadConfig, head)
        dims = self.backbone.feature_dims
        self.head = AVEHead(dims["visual"], dims["audio"], self.head_config)
        self.build_unimodal_heads()
        self.save_hyperparameters(plain({"backbone": self.backbone_config, "head": self.head_config,
                                         "optim": self.optim, "unimodal": self.unimodal,
                                         "background_clips": background_clips}))

    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        return self.head(feats.visual, feats.audio)

    # ---- auxiliary uni-modal heads ------------------------------------------------------------------------
    def make_unimodal_head(self, modality: str) -> nn.Module:
        """Per-segment event/background logit and clip-level class logits from one modality's features."""
        dim = self.backbone.feature_dims[modality]
        return nn.ModuleDict({"event": Readout(dim, 1), "cls": Readout(dim, self.head_config.num_classes)})

    def unimodal_head_forward(self, modality: str, feats: BackboneOutput, batch: Batch) -> Outputs:
        head = self.unimodal_heads[modality]  # type: ignore[index]
        x = getattr(feats, modality)  # (B, T, C)
        cls = head["cls"](x.mean(1))  # (B, num_classes)
        return {"is_event": head["event"](x).squeeze(-1), "event_scores": cls, "av_score": cls}

    def unimodal_sample_loss(self, modality: str, outputs: Outputs, batch: Batch) -> Tensor:
        """The fused losses per clip: event/background BCE over segments + class CE on clips with an event."""
        label = batch["label"]  # (B, T)
        cls, has_event = video_class(label)
        bce = F.binary_cross_entropy_with_logits(outputs["is_event"].float(), (label != BACKGROUND).float(),
                                                 reduction="none").mean(-1)
        ce = F.cross_entropy(outputs["event_scores"].float(), cls, reduction="none")
        return bce + ce * has_event

    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        """The official three terms (``AVMOE/AVE/main_trans_v3.py``, ``train``), present in every batch."""
        label = batch["label"]  # (B, T)
        cls, has_event = video_class(label)
        is_event = outputs["is_event"]  # (B, T)
        losses = {"loss_event": F.binary_cross_entropy_with_logits(is_event, (label != BACKGROUND).to(is_event.dtype))}
        for name, key in (("loss_class", "event_scores"), ("loss_av", "av_score")):
            ce = F.cross_entropy(outputs[key], cls, reduction="none")  # (B,)
            if self.background_clips == "official":
                losses[name] = ce.mean()
            else:  # masked mean: a batch without events gives 0 with (zero) gradients, never a missing term
                weight = has_event.to(ce.dtype)
                losses[name] = (ce * weight).sum() / weight.sum().clamp(min=1)
        return losses

    def make_metric(self) -> Metric:
        return AVESegmentAccuracy(num_classes=BACKGROUND + 1)

    def name_details(self, details: dict[str, Any]) -> dict[str, Any]:
        names = (*AVE_CATEGORIES, "background")
        return {k: {names[c]: v for c, v in d.items()} for k, d in details.items()}

    def update_metric(self, metric: Metric, outputs: Outputs, batch: Batch) -> None:
        metric.update(batch[INDEX], self.predict_segments(outputs), batch["label"])

    @staticmethod
    def predict_segments(outputs: Outputs) -> Tensor:
        return ave_segment_predictions(outputs["is_event"], outputs["event_scores"])

    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Softmax probability of the clip's event class; background-only clips: mean P(background)."""
        cls, has_event = video_class(batch["label"])
        p_cls = outputs["event_scores"].float().softmax(-1).gather(1, cls[:, None]).squeeze(1)
        p_bg = 1 - torch.sigmoid(outputs["is_event"].float()).mean(-1)
        return torch.where(has_event, p_cls, p_bg)

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Fraction of correctly classified segments per clip."""
        return (self.predict_segments(outputs) == batch["label"]).float().mean(-1)

    prediction_name = "ave"

    def predictions(self, batch: Batch, outputs: Outputs) -> dict[str, Any]:
        probs = outputs["event_scores"].float().softmax(-1)  # (B, C)
        return {INDEX: batch[INDEX], "video_id": batch.get("video_id"), "segments": self.predict_segments(outputs),
                "event_prob": torch.sigmoid(outputs["is_event"].float()),  # (B, T) P(segment holds the event)
                "class_prob": probs.max(-1).values, "class_id": probs.argmax(-1)}  # (B,) the clip's event class

    def prediction_records(self, batch: Batch, predictions: dict[str, Any]) -> list[dict[str, Any]]:
        """Per clip: the event name of every 1-s segment (``background`` for class 28) and the class ids, with
        scores: the clip's event class and its probability, and per segment P(event) (> 0.5: not background)."""
        names = (*AVE_CATEGORIES, "background")
        vids = predictions["video_id"] or [None] * len(predictions[INDEX])
        rows = zip(predictions[INDEX].tolist(), vids, predictions["segments"].tolist(),
                   predictions["event_prob"].tolist(), predictions["class_prob"].tolist(),
                   predictions["class_id"].tolist())
        return [{"index": int(index), "video_id": vid, "segments": [names[c] for c in seg],
                 "segment_ids": [int(c) for c in seg], "event": names[cls], "event_score": round(p_cls, 4),
                 "segment_event_prob": [round(p, 4) for p in p_seg]}
                for index, vid, seg, p_seg, p_cls, cls in rows]
