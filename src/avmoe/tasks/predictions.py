"""``predict`` output files: per-sample records gathered over the ranks and written once, as JSON.

Every task turns its batch predictions into JSON-able records with an ``index`` (the sample's position in the
split). Under DDP the records of all ranks are gathered, the sampler's padding duplicates are dropped by index,
and rank zero writes ``<run folder>/predictions/<task>_predictions.json`` (temp file + ``os.replace``, so a
reader never sees half a file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def gather_records(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """All ranks' records, one per ``index``, sorted by index (every rank gets the same list)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    unique = {r["index"]: r for r in reversed(records)}  # DDP padding repeats samples: keep one per index
    return [unique[i] for i in sorted(unique)]


PROBABILITY_SCALE = 65535  # a probability PNG holds round(p * 65535) as 16-bit grey: read back with / 65535


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A binary mask (H, W) as an 8-bit PNG (0 / 255), written atomically (padding may write a clip twice)."""
    _write_png(path, mask.astype(np.uint8) * 255)


def write_probability_png(path: Path, prob: np.ndarray) -> None:
    """Probabilities (H, W) in [0, 1] as a 16-bit grey PNG holding ``round(p * 65535)`` (step 1.5e-5, lossless)."""
    _write_png(path, np.round(np.clip(prob, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16))


def read_probability_png(path: Path) -> np.ndarray:
    """(H, W) float32 probabilities of a PNG written by :func:`write_probability_png`."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        return np.asarray(img).astype(np.float32) / PROBABILITY_SCALE


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def event_runs(active: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of true segments: (T,) bool -> [(onset, offset)] with offset exclusive (seconds)."""
    runs, start = [], None
    for t, on in enumerate(list(active) + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs

