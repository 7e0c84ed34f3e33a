"""AVVP (audio-visual video parsing on LLP): the official segment- and event-level F-scores.

Algorithm of YapengTian/AVVP-ECCV20 ``utils/eval_metrics.py`` and ``main_avvp.py::eval``
(YapengTian/AVVP-ECCV20 ``main_avvp.py::eval`` and ``utils/eval_metrics.py``), vectorised over classes and videos:

- per class c, counts TP/FP/FN; a class is *active* when ``TP + FP > 0`` or ``TP + FN > 0``; a video's F is the
  mean of ``2TP / (2TP + FP + FN)`` over its active classes, and **1.0 when no class is active**;
- segment level counts segments; event level counts events = maximal runs of consecutive 1s per class. A
  predicted event is a TP when its IoU with *any* ground-truth event is >= 0.5 (else an FP); a ground-truth
  event is an FN when no predicted event reaches IoU 0.5 with it. Matching is not one-to-one;
- four values per video, in the official order: audio, visual, "event" (audio and visual counts pooled per
  class, Event@AV) and audio-visual (the products ``pred_a * pred_v`` against ``gt_a * gt_v``);
- the reported numbers are means over videos; Type@AV = (audio + visual + audio-visual) / 3 of those means.

Predictions are thresholded as the official evaluation does: video-level ``p >= 0.5`` and segment-level
``p >= 0.5``, the segment predictions masked by the predicted video-level labels.

Values are fractions in [0, 1] (the papers print 100x).
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from avmoe.metrics.base import PerSampleMetric

ArrayLike = Union[np.ndarray, Tensor]
THRESHOLD = 0.5
LEVELS = ("segment", "event")
# Per-video values in the official return order of segment_level / event_level.
VIDEO_VALUES = ("audio", "visual", "event", "av")
# The ten reported numbers per level: Audio, Visual, Audio-Visual, Type@AV, Event@AV.
REPORTED = ("audio", "visual", "av", "type", "event")
METRIC_NAMES = tuple(f"{level}_{name}" for level in LEVELS for name in REPORTED)


# ------------------------------------------------------------------------------------------------ helpers


def _as_binary(x: ArrayLike, name: str) -> Tensor:
    """numpy / torch, bool or {0, 1} -> float64 tensor; anything else is an error (the official code would
    silently treat a 2 as 'no event' in one place and as a count in another)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach()
    t = t.to(torch.float64)
    if t.numel() and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must be binary (0/1 or bool); got values outside {{0, 1}}")
    return t


def f_score(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """Mean F over active classes, 1.0 when none is active. Counts (..., C) -> (...)."""
    active = (tp + fp > 0) | (tp + fn > 0)
    per_class = torch.where(active, 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12), torch.zeros_like(tp))
    n_active = active.sum(-1)
    mean = per_class.sum(-1) / n_active.clamp(min=1)
    return torch.where(n_active > 0, mean, torch.ones_like(mean))


def segment_counts(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TP, FP, FN per class over segments. pred, gt (..., C, T) binary -> three (..., C)."""
    tp = (pred * gt).sum(-1)
    fp = (pred * (1 - gt)).sum(-1)
    fn = ((1 - pred) * gt).sum(-1)
    return tp, fp, fn


def _runs(x: Tensor) -> Tensor:
    """One-hot runs of consecutive 1s. x (..., T) binary -> (..., R, T) with R = ceil(T / 2) run slots.

    Run r (0-based, left to right) of a row is ``out[..., r, :]``; unused slots are all zero.
    """
    t = x.shape[-1]
    prev = torch.nn.functional.pad(x[..., :-1], (1, 0))
    starts = x * (1 - prev)  # 1 where a run begins
    run_id = torch.cumsum(starts, dim=-1) * x - 1  # (..., T): 0.. for run members, -1 elsewhere
    slots = torch.arange((t + 1) // 2, dtype=x.dtype, device=x.device)  # (R,)
    return (run_id.unsqueeze(-2) == slots.view(-1, 1)).to(x.dtype)  # (..., R, T)


def event_counts(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TP, FP, FN per class over events (runs), IoU >= 0.5 against any event. (..., C, T) -> three (..., C)."""
    p_runs, g_runs = _runs(pred), _runs(gt)  # (..., C, R, T)
    p_len, g_len = p_runs.sum(-1), g_runs.sum(-1)  # (..., C, R)
    inter = p_runs @ g_runs.transpose(-1, -2)  # (..., C, Rp, Rg)
    union = p_len.unsqueeze(-1) + g_len.unsqueeze(-2) - inter
    p_valid, g_valid = p_len > 0, g_len > 0
    # Official test: sum(x1 * x2) >= 0.5 * sum(x1 + x2 - x1 * x2); empty slots never match.
    match = (inter >= 0.5 * union) & p_valid.unsqueeze(-1) & g_valid.unsqueeze(-2)
    tp = (match.any(-1) & p_valid).sum(-1)
    fp = p_valid.sum(-1) - tp
    fn = (~match.any(-2) & g_valid).sum(-1)
    return tp.to(pred.dtype), fp.to(pred.dtype), fn.to(pred.dtype)


def _four_values(counts: Any, pa: Tensor, pv: Tensor, ga: Tensor, gv: Tensor) -> Tensor:
    """(audio, visual, event, audio-visual) F per video. Inputs (..., C, T) -> (..., 4)."""
    tp_a, fp_a, fn_a = counts(pa, ga)
    tp_v, fp_v, fn_v = counts(pv, gv)
    tp_av, fp_av, fn_av = counts(pa * pv, ga * gv)
    return torch.stack(
        [
            f_score(tp_a, fp_a, fn_a),
            f_score(tp_v, fp_v, fn_v),
            f_score(tp_a + tp_v, fp_a + fp_v, fn_a + fn_v),
            f_score(tp_av, fp_av, fn_av),
        ],
        dim=-1,
    )


def _one_video(counts: Any, arrays: tuple[ArrayLike, ...]) -> tuple[float, float, float, float]:
    names = ("pred_audio", "pred_visual", "gt_audio", "gt_visual")
    tensors = [_as_binary(a, n) for a, n in zip(arrays, names)]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or tensors[0].dim() != 2:
        got = [tuple(t.shape) for t in tensors]
        raise ValueError(f"expected four (C, T) arrays of one shape (25 x 10 on LLP), got {got}")
    values = _four_values(counts, *tensors)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ public


def avvp_segment_level(
    pred_audio: ArrayLike, pred_visual: ArrayLike, gt_audio: ArrayLike, gt_visual: ArrayLike
) -> tuple[float, float, float, float]:
    """Segment-level F of one video, as official ``segment_level``.

    Args:
        pred_audio: (C, T) binary audio predictions (25 x 10 on LLP), numpy or torch.
        pred_visual: (C, T) binary visual predictions.
        gt_audio: (C, T) binary audio ground truth.
        gt_visual: (C, T) binary visual ground truth.

    Returns:
        ``(audio, visual, event, audio_visual)``; the audio-visual arrays are the products of the two modalities.
    """
    return _one_video(segment_counts, (pred_audio, pred_visual, gt_audio, gt_visual))


def avvp_event_level(
    pred_audio: ArrayLike, pred_visual: ArrayLike, gt_audio: ArrayLike, gt_visual: ArrayLike
) -> tuple[float, float, float, float]:
    """Event-level F of one video, as official ``event_level`` (same arguments and order as
    :func:`avvp_segment_level`)."""
    return _one_video(event_counts, (pred_audio, pred_visual, gt_audio, gt_visual))


def avvp_predictions(
    global_prob: Tensor, audio_prob: Tensor, visual_prob: Tensor, threshold: float = THRESHOLD
) -> tuple[Tensor, Tensor]:
    """Binary segment predictions as the official eval: ``(p_seg >= t) * (p_video >= t)``.

    Args:
        global_prob: (B, C) video-level probabilities.
        audio_prob: (B, C, T) audio segment probabilities.
        visual_prob: (B, C, T) visual segment probabilities.
        threshold: 0.5 officially.

    Returns:
        Audio and visual predictions, (B, C, T) float {0, 1}.
    """
    video = (global_prob >= threshold).unsqueeze(-1)  # (B, C, 1): predicted weak labels mask the segments
    return ((audio_prob >= threshold) & video).float(), ((visual_prob >= threshold) & video).float()


def avvp_video_scores(pred_audio: Tensor, pred_visual: Tensor, gt_audio: Tensor, gt_visual: Tensor) -> Tensor:
    """Per-video F values, batched. Inputs (B, C, T) binary -> (B, 8): segment then event level, each
    (audio, visual, event, audio_visual)."""
    args = [t.to(torch.float64) for t in (pred_audio, pred_visual, gt_audio, gt_visual)]
    return torch.cat([_four_values(segment_counts, *args), _four_values(event_counts, *args)], dim=-1)


def avvp_summary(video_scores: Tensor) -> dict[str, Tensor]:
    """The ten reported numbers from per-video values (N, 8) (rows of :func:`avvp_video_scores`)."""
    out: dict[str, Tensor] = {}
    for i, level in enumerate(LEVELS):
        mean = video_scores[:, 4 * i : 4 * i + 4].double().mean(0)  # audio, visual, event, av
        a, v, event, av = mean.unbind()
        values = {"audio": a, "visual": v, "av": av, "type": (a + v + av) / 3, "event": event}
        out.update({f"{level}_{k}": values[k].float() for k in REPORTED})
    return out


class AVVPMetric(PerSampleMetric):
    """The official AVVP evaluation over each video exactly once (DDP padding removed by sample index).

    ``update`` thresholds the model outputs like ``main_avvp.py::eval`` and stores the eight per-video F values;
    ``compute`` averages them over videos and returns the ten numbers :data:`METRIC_NAMES`
    (``segment_audio``, ``segment_visual``, ``segment_av``, ``segment_type``, ``segment_event`` and the same at
    ``event_`` level), as fractions.

    Args:
        threshold: probability threshold of the video- and segment-level predictions (0.5 officially).
    """

    def __init__(self, threshold: float = THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(  # type: ignore[override]
        self,
        index: Tensor,
        global_prob: Tensor,
        audio_prob: Tensor,
        visual_prob: Tensor,
        gt_audio: Tensor,
        gt_visual: Tensor,
    ) -> None:
        """index (B,), global_prob (B, C), audio/visual_prob (B, C, T), gt_audio/gt_visual (B, C, T) binary."""
        pa, pv = avvp_predictions(global_prob.float(), audio_prob.float(), visual_prob.float(), self.threshold)
        scores = avvp_video_scores(pa, pv, gt_audio, gt_visual)  # (B, 8)
        args = [t.to(torch.float64) for t in (pa, pv, gt_audio, gt_visual)]
        # Per-class TP / FP / FN of audio and visual events together (the "event" F), segment then event level.
        per_class = [torch.stack(c(args[0], args[2])) + torch.stack(c(args[1], args[3]))
                     for c in (segment_counts, event_counts)]  # each (3, B, C)
        extra = torch.cat([p.permute(1, 0, 2).flatten(1) for p in per_class], dim=1)  # (B, 6 C)
        super().update(index, torch.cat([scores, extra.to(scores.dtype)], dim=1))

    def compute(self) -> dict[str, Tensor]:
        _, values = self.rows()
        if values.numel() == 0:
            return {name: torch.tensor(0.0) for name in METRIC_NAMES}
        return avvp_summary(values[:, :8])

    def details(self) -> dict[str, dict[int, float]]:
        """``per_class_f1_segment`` / ``per_class_f1_event``: F1 of each class over all videos (audio and visual
        events pooled, TP/FP/FN summed over videos), for the classes predicted or present at least once."""
        _, values = self.rows()
        if values.numel() == 0:
            return {}
        counts = values[:, 8:].double().sum(0).view(2, 3, -1)  # (level, tp/fp/fn, C)
        out = {}
        for level, (tp, fp, fn) in zip(LEVELS, counts):
            seen = (tp + fp + fn) > 0
            f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12)
            out[f"per_class_f1_{level}"] = {c: float(f1[c]) for c in range(f1.numel()) if seen[c]}
        return out
