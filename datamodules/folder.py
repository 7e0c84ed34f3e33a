"""``predict`` on your own videos: every ``*.mp4`` of a folder through a task's own decoding pipeline.

``lightning predict --config ave.yaml --ckpt_path best.ckpt --data.init_args.predict_dir my_videos/`` decodes
each mp4 exactly as the dataset's clips and writes the task's predictions per file:

* AVE, AVVP: frames at the segment centres t + 0.5 s and the log-mel of the audio track (or of a ``<name>.wav``
  beside the mp4), for the first 10 s;
* AVS (``AVSBenchFolderDataset``): the five frames at l + 15/16 s of the first 5 s (the official extraction) and
  five 1-s log-mel segments;
* AVQA: the questions of ``data.predict_questions`` on the files they name, sampled as the release's videos
  (``num_segments`` over the first ``clip_seconds``).

A file shorter than that fails with a decode error naming it (``on_decode_error: skip`` drops it instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def folder_videos(folder: str | Path) -> list[Path]:
    """The ``*.mp4`` files of ``folder`` (not recursive), sorted by name; a clear error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.predict_dir: folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() == ".mp4" and p.is_file())
    if not files:
        raise FileNotFoundError(f"data.predict_dir: no .mp4 file in {root}")
    return files


class FolderClips:
    """Mixin for a dataset class: ``video_path(i)`` is the i-th file of a folder; audio from the mp4, or from a
    same-named ``.wav`` beside it (``audio_source`` auto / wav)."""

    paths: list[Path]
    audio_source: str

    def video_path(self, index: int) -> Path:
        return self.paths[index]

    def audio_path(self, index: int) -> Path:
        video = self.paths[index]
        wav = video.with_suffix(".wav")
        if self.audio_source == "wav" or (self.audio_source == "auto" and wav.is_file()):
            return wav
        return video


def folder_table(files: list[Path], **columns: Any) -> pd.DataFrame:
    """A split-like table of the files (``video_id`` = file stem) with constant placeholder label ``columns``."""
    stems = [p.stem for p in files]
    return pd.DataFrame({"video_id": stems, **{k: np.full(len(files), v) for k, v in columns.items()}})


def make_folder_dataset(base: type, files: list[Path], *args: Any, **kwargs: Any) -> Any:
    """An instance of ``base`` (a dataset class with ``video_path``/``audio_path``) reading ``files``."""
    cls = type(f"Folder{base.__name__}", (FolderClips, base), {})
    dataset = cls(*args, **kwargs)
    dataset.paths = list(files)
    return dataset
