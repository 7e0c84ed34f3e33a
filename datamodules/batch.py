"""The batch contract shared by every DataModule, task module and callback.

A sample (one item of a Dataset) and a batch are plain dicts:

============== ============================ ===================================================================
key            sample shape / dtype          meaning
============== ============================ ===================================================================
``video``      (T, 3, H, W) uint8            T frames, RGB, resized in the worker; normalised on the device
``audio``      (T, F, M) float32             one log-mel per 1-s segment (F frames x M mel bins), librosa, in
                                             the worker (``avmoe.datamodules.audio.LogMel``)
``audio_mask`` () float32                    1.0 when the audio modality is present, 0.0 when it is removed
``visual_mask`` () float32                   same for the visual modality (valuation re-sampling sets these)
``index``      () int64                      stable sample index = position in the Dataset (row-keyed, never
                                             video-keyed); used to de-duplicate DDP padding and by callbacks
task targets   per task                      AVE ``label`` (T,) int64 in [0, 28], 28 = background;
                                             AVVP ``labels`` (C,) float, ``gt_audio``/``gt_visual`` (C, T);
                                             AVS ``mask`` (T, 1, H, W) float {0,1}, ``mask_valid`` (T,) bool;
                                             AVQA ``question`` (L,) int64, ``answer`` () int64, ``qtype`` () int64
============== ============================ ===================================================================

Non-tensor values (``video_id`` strings, ``question_id``) are collated into lists. Samples that failed to
decode under the ``skip`` policy arrive as :class:`SkippedSample` and are removed by :func:`collate`, which
records them under ``batch["skipped"]`` (list of ``(path, reason)``) so the DataModule can count and log them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

VIDEO = "video"
AUDIO = "audio"
AUDIO_MASK = "audio_mask"
VISUAL_MASK = "visual_mask"
INDEX = "index"
SKIPPED = "skipped"
MODALITIES = ("audio", "visual")


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder for a clip that could not be decoded (policy ``skip``)."""

    index: int
    path: str
    reason: str


def collate(samples: list[Any]) -> dict[str, Any]:
    """Collate sample dicts; drop :class:`SkippedSample` items and record them under ``skipped``."""
    skipped = [(s.path, s.reason) for s in samples if isinstance(s, SkippedSample)]
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    if not kept:
        return {SKIPPED: skipped, INDEX: torch.zeros(0, dtype=torch.long)}
    tensor_keys = [k for k, v in kept[0].items() if isinstance(v, (torch.Tensor, int, float))]
    batch: dict[str, Any] = default_collate([{k: s[k] for k in tensor_keys} for s in kept])
    for key in kept[0]:
        if key not in batch:
            batch[key] = [s[key] for s in kept]
    batch[SKIPPED] = skipped
    return batch


def batch_size(batch: dict[str, Any]) -> int:
    return int(batch[INDEX].shape[0])
