"""AVE event localization: the official segment accuracy.

Prediction rule (DG-SCT / AVMoE ``compute_accuracy_supervised``): a segment is the argmax event class when
``sigmoid(is_event) > 0.5`` and background (28) otherwise. Aggregation is the micro accuracy over all test
segments, as the AVE release's ``compute_acc`` (``accuracy_score`` over 402 x 10 segments); DG-SCT's running
mean over batches differs slightly and depends on the batch size, so it is not used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avmoe.metrics.base import PerSampleMetric

BACKGROUND = 28


def ave_segment_predictions(is_event: Tensor, event_scores: Tensor, background: int = BACKGROUND) -> Tensor:
    """Per-segment class predictions. is_event (B, T) logits, event_scores (B, C) -> (B, T) int64."""
    cls = event_scores.argmax(-1, keepdim=True).expand_as(is_event)  # (B, T)
    return torch.where(torch.sigmoid(is_event) > 0.5, cls, torch.full_like(cls, background))


def ave_segment_accuracy(pred: Tensor, target: Tensor) -> float:
    """Micro accuracy over all segments. pred, target (B, T) int."""
    return (pred == target).float().mean().item()


class AVESegmentAccuracy(PerSampleMetric):
    """Segment accuracy over each sample exactly once (DDP padding removed by sample index)."""

    def update(self, index: Tensor, pred: Tensor, target: Tensor) -> None:  # pred, target (B, T)
        correct = (pred == target).sum(-1, keepdim=True).float()
        total = torch.full_like(correct, target.shape[-1])
        super().update(index, torch.cat([correct, total], dim=-1))

    def compute(self) -> dict[str, Tensor]:
        _, values = self.rows()
        if values.numel() == 0:
            return {"acc": torch.tensor(0.0)}
        return {"acc": values[:, 0].sum() / values[:, 1].sum()}
