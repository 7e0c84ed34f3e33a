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
    """Segment accuracy over each sample exactly once (DDP padding removed by sample index).

    Args:
        num_classes: with it, :meth:`details` also gives the per-class segment accuracy (segments whose target
            is class c, predicted c), classes 0..num_classes-1 (AVE: 28 events + background = 29).
    """

    def __init__(self, num_classes: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def update(self, index: Tensor, pred: Tensor, target: Tensor) -> None:  # pred, target (B, T)
        hit = pred == target  # (B, T)
        correct = hit.sum(-1, keepdim=True).float()
        total = torch.full_like(correct, target.shape[-1])
        columns = [correct, total]
        if self.num_classes:
            onehot = torch.nn.functional.one_hot(target.long(), self.num_classes).float()  # (B, T, K)
            columns += [(onehot * hit[..., None]).sum(1), onehot.sum(1)]  # (B, K) hits, (B, K) segments
        super().update(index, torch.cat(columns, dim=-1))

    def details(self) -> dict[str, dict[int, float]]:
        """``per_class_acc`` {class: accuracy} over the classes with at least one target segment."""
        _, values = self.rows()
        if not self.num_classes or values.numel() == 0:
            return {}
        k = self.num_classes
        hits, segments = values[:, 2:2 + k].sum(0), values[:, 2 + k:2 + 2 * k].sum(0)
        return {"per_class_acc": {c: float(hits[c] / segments[c]) for c in range(k) if segments[c] > 0}}

    def compute(self) -> dict[str, Tensor]:
        _, values = self.rows()
        if values.numel() == 0:
            return {"acc": torch.tensor(0.0)}
        return {"acc": values[:, 0].sum() / values[:, 1].sum()}
