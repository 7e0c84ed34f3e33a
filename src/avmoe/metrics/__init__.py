"""Official-parity metrics: plain functions and torchmetrics classes."""

from avmoe.metrics.ave import AVESegmentAccuracy, ave_segment_accuracy, ave_segment_predictions
from avmoe.metrics.base import PerSampleMetric

__all__ = ["AVESegmentAccuracy", "PerSampleMetric", "ave_segment_accuracy", "ave_segment_predictions"]
