"""MUSIC-AVQA: the official accuracy per question type, per modality group and overall.

Official evaluation (GeWu-Lab/MUSIC-AVQA ``net_grd_avst/main_avst.py::test``): one
question at a time, ``predicted = argmax(logits)``, correct iff ``predicted == label``. Every reported number is a
**micro** mean over questions: a type's accuracy is correct/total over its questions, a modality group's
(Audio, Visual, Audio-Visual) is correct/total over all questions of its types (not the mean of the type
accuracies), and the overall accuracy is correct/total over every question.

Differences from the official script, deliberately: the type of a question is read from its own row (the
official ``test()`` looks it up by batch position in the hard-coded ``json/avqa-test.json``, which misaligns on
``json_update``), and each question is counted once under DDP padding (:class:`PerSampleMetric`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avmoe.metrics.base import PerSampleMetric

# (modality group, type) in the official reporting order; the position is the ``qtype`` index of a sample.
QUESTION_TYPES: tuple[tuple[str, str], ...] = (
    ("Audio", "Counting"),
    ("Audio", "Comparative"),
    ("Visual", "Counting"),
    ("Visual", "Location"),
    ("Audio-Visual", "Existential"),
    ("Audio-Visual", "Counting"),
    ("Audio-Visual", "Location"),
    ("Audio-Visual", "Comparative"),
    ("Audio-Visual", "Temporal"),
)
GROUPS: tuple[str, ...] = ("Audio", "Visual", "Audio-Visual")
_GROUP_KEYS = {"Audio": "audio", "Visual": "visual", "Audio-Visual": "av"}


def type_key(qtype: int) -> str:
    """Metric name of a question type, e.g. ``acc_av_temporal``."""
    group, name = QUESTION_TYPES[qtype]
    return f"acc_{_GROUP_KEYS[group]}_{name.lower()}"


def group_key(group: str) -> str:
    """Metric name of a modality group, e.g. ``acc_audio``."""
    return f"acc_{_GROUP_KEYS[group]}"


def qtype_index(group: str, name: str) -> int:
    """Index in :data:`QUESTION_TYPES` of ``(group, name)``; ValueError for an unknown pair."""
    try:
        return QUESTION_TYPES.index((group, name))
    except ValueError:
        known = ", ".join(f"{g}/{n}" for g, n in QUESTION_TYPES)
        raise ValueError(f"unknown MUSIC-AVQA question type {group}/{name} (known: {known})") from None


def avqa_accuracy(correct: Tensor, qtype: Tensor) -> dict[str, Tensor]:
    """Micro accuracies from per-question correctness.

    Args:
        correct: (N,) bool or {0, 1}, one entry per question (each question once).
        qtype: (N,) int, index into :data:`QUESTION_TYPES`.

    Returns:
        ``acc`` (overall), ``acc_<group>`` and ``acc_<group>_<type>`` for every group/type that has at least one
        question (an absent type has no defined accuracy and is left out rather than reported as 0).
    """
    correct = correct.float().view(-1)
    qtype = qtype.long().view(-1)
    if correct.numel() == 0:
        return {"acc": torch.tensor(0.0)}
    n_types = len(QUESTION_TYPES)
    hits = torch.zeros(n_types, device=correct.device).index_add_(0, qtype, correct)
    totals = torch.zeros(n_types, device=correct.device).index_add_(0, qtype, torch.ones_like(correct))
    out = {"acc": correct.sum() / correct.numel()}
    for group in GROUPS:
        members = [i for i, (g, _) in enumerate(QUESTION_TYPES) if g == group]
        total = totals[members].sum()
        if total > 0:
            out[group_key(group)] = hits[members].sum() / total
    for i in range(n_types):
        if totals[i] > 0:
            out[type_key(i)] = hits[i] / totals[i]
    return out


class AVQAAccuracy(PerSampleMetric):
    """Per-type / per-group / overall micro accuracy, each question once (rows keyed by sample index)."""

    def update(self, index: Tensor, pred: Tensor, target: Tensor, qtype: Tensor) -> None:  # each (B,)
        correct = (pred.view(-1) == target.view(-1)).float()
        super().update(index, torch.stack([correct, qtype.view(-1).float(), target.view(-1).float()], dim=-1))

    def details(self) -> dict[str, dict[int, float]]:
        """``per_answer_acc`` {answer class: accuracy over the questions whose answer it is}."""
        _, values = self.rows()
        if values.numel() == 0:
            return {}
        answers = values[:, 2].long()
        return {"per_answer_acc": {int(a): float(values[answers == a, 0].mean()) for a in answers.unique()}}

    def compute(self) -> dict[str, Tensor]:
        _, values = self.rows()
        if values.numel() == 0:
            return {"acc": torch.tensor(0.0)}
        return avqa_accuracy(values[:, 0], values[:, 1].long())
