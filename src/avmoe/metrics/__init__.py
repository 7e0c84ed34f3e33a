"""Official-parity metrics: plain functions and torchmetrics classes."""

from avmoe.metrics.ave import AVESegmentAccuracy, ave_segment_accuracy, ave_segment_predictions
from avmoe.metrics.avqa import QUESTION_TYPES, AVQAAccuracy, avqa_accuracy
from avmoe.metrics.avs import AVSMetric, avs_f_measure, avs_mask_iou
from avmoe.metrics.avvp import AVVPMetric, avvp_event_level, avvp_predictions, avvp_segment_level
from avmoe.metrics.base import PerSampleMetric

__all__ = [
    "AVESegmentAccuracy",
    "AVQAAccuracy",
    "AVSMetric",
    "AVVPMetric",
    "PerSampleMetric",
    "QUESTION_TYPES",
    "ave_segment_accuracy",
    "ave_segment_predictions",
    "avqa_accuracy",
    "avs_f_measure",
    "avs_mask_iou",
    "avvp_event_level",
    "avvp_predictions",
    "avvp_segment_level",
]
