"""AVE (Audio-Visual Event localisation, YapengTian/AVE-ECCV18) from the official release.

Layout under ``root`` (YapengTian/AVE-ECCV18 release)::

    Annotations.txt               Category&VideoID&Quality&StartTime&EndTime, with or without header
    trainSet.txt valSet.txt testSet.txt   same 5 fields, no header
    AVE/<VideoID>.mp4             10-s clips (optionally <VideoID>.wav beside them)

One sample = one split-file row (VideoIDs repeat with different categories, even across splits).
Segment ``t`` (of 10 one-second segments) is labelled with the row's category if
``StartTime <= t < EndTime``, else background (28).

Frame rule: one frame per segment at its centre, ``t + 0.5`` s. The official pipeline takes
``linspace`` indices over frames pre-extracted at a fixed rate; the centre frame is the decoder-
independent equivalent of one frame per segment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .annotations import AnnotationError, read_annotation_text, require_rows
from .audio import LogMel, LogMelConfig
from .base import AVDataModule, ClipDataset, DecodePolicy, resize_frames
from .decoding import DecodeError, VideoBackend, read_audio, read_frames
from .folder import folder_table, folder_videos, make_folder_dataset

# Official class order (first appearance in Annotations.txt), spelled as in the files.
AVE_CATEGORIES: tuple[str, ...] = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
)
BACKGROUND = 28
NUM_CLASSES = 29
NUM_SEGMENTS = 10
AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime"
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
ANNOTATIONS_FILE = "Annotations.txt"
VIDEO_DIR = "AVE"
AudioSource = Literal["auto", "video", "wav"]
_CATEGORY_INDEX = {name: i for i, name in enumerate(AVE_CATEGORIES)}
_COLUMNS = ["category", "video_id", "quality", "start", "end"]
_SECONDS = re.compile(r"[0-9]{1,2}")  # ASCII digits only: int() would also take "1_0", " 3" or Arabic-Indic digits


def read_ave_list(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse an AVE list file (``Annotations.txt`` or a split file).

    Returns:
        DataFrame with columns ``category`` (str), ``video_id`` (str), ``quality`` (str),
        ``start``/``end`` (int64 seconds), ``class_index`` (int64) and ``line`` (1-based).

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: bytes that are not UTF-8, or a malformed row (field count, times that are not whole
            seconds in [0, 10], start > end, unknown category, empty VideoID); the message names the file and
            the 1-based line. (A ``ValueError`` subclass.)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVE list file not found: {path}")
    text = read_annotation_text(path)
    rows: list[tuple[Any, ...]] = []
    for line_no, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        line = raw.strip()
        if not line or (line_no == 1 and line == AVE_HEADER):
            continue
        rows.append((*_parse_row(line, path, line_no), line_no))
    return _frame(rows, [*_COLUMNS, "class_index", "line"], ints=("start", "end", "class_index", "line"))


def _frame(rows: list[tuple[Any, ...]], columns: list[str], ints: tuple[str, ...]) -> pd.DataFrame:
    """Rows -> DataFrame with int64 ``ints`` columns and object (str) others, built column-wise (fast)."""
    cols = list(zip(*rows)) if rows else [()] * len(columns)
    return pd.DataFrame({
        name: np.asarray(col, dtype=np.int64) if name in ints else pd.Series(list(col), dtype=object)
        for name, col in zip(columns, cols)
    })


def _parse_row(line: str, path: Path, line_no: int) -> tuple[Any, ...]:
    def bad(reason: str) -> AnnotationError:
        return AnnotationError(path, reason, line_no)

    fields = [f.strip() for f in line.split("&")]
    if len(fields) != 5:
        raise bad(f"expected 5 '&'-separated fields ({AVE_HEADER}), got {len(fields)}: {line!r}")
    category, video_id, quality, start_s, end_s = fields
    if not (_SECONDS.fullmatch(start_s) and _SECONDS.fullmatch(end_s)):
        raise bad(f"StartTime/EndTime must be integers (whole seconds, ASCII digits), got {start_s!r}/{end_s!r}")
    start, end = int(start_s), int(end_s)
    if not 0 <= start <= end <= NUM_SEGMENTS:
        raise bad(f"need 0 <= StartTime <= EndTime <= {NUM_SEGMENTS}, got {start}/{end}")
    if category not in _CATEGORY_INDEX:
        raise bad(f"unknown category {category!r} (not one of the 28 AVE categories)")
    if not video_id:
        raise bad("empty VideoID")
    return category, video_id, quality, start, end, _CATEGORY_INDEX[category]


def segment_labels(class_index: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``(N, 10)`` int64: the category where ``start <= t < end``, else :data:`BACKGROUND`."""
    t = np.arange(NUM_SEGMENTS)[None, :]
    inside = (start[:, None] <= t) & (t < end[:, None])
    return np.where(inside, class_index[:, None], BACKGROUND).astype(np.int64)


def _annotation_rows(split: pd.DataFrame, annotations: pd.DataFrame, split_path: Path,
                     annotations_path: Path | str = ANNOTATIONS_FILE) -> np.ndarray:
    """0-based Annotations.txt row of every split row (as the official ``*_order.h5``).

    The k-th identical copy of a row in a split maps to the k-th identical copy in Annotations.txt; a split row
    without its own copy there is an :class:`AnnotationError` (a repeated row says so, naming the first copy).
    """
    key = ["category", "video_id", "start", "end"]
    rows_of: dict[tuple[Any, ...], list[int]] = {}
    for row, values in enumerate(zip(*(annotations[c].tolist() for c in key))):
        rows_of.setdefault(values, []).append(row)
    seen: dict[tuple[Any, ...], list[int]] = {}  # split lines of each key so far
    out = np.empty(len(split), dtype=np.int64)
    for i, (values, line) in enumerate(zip(zip(*(split[c].tolist() for c in key)), split["line"].tolist())):
        lines = seen.setdefault(values, [])
        lines.append(int(line))
        held = rows_of.get(values, [])
        if len(lines) > len(held):
            if held:
                raise AnnotationError(split_path, f"this row repeats line {lines[0]} of the split file "
                                      f"({len(lines)} copies so far), but {annotations_path} holds {len(held)} "
                                      "copy(ies) of it: remove the repeated row", int(line))
            raise AnnotationError(split_path, f"row not found in {annotations_path} (no row there has this "
                                  "Category, VideoID, StartTime and EndTime)", int(line))
        out[i] = held[len(lines) - 1]
    return out


class AVEDataset(ClipDataset):
    """One AVE split; metadata in a pandas frame and numpy arrays (see module docstring).

    Args:
        root: AVE release root.
        table: parsed split file (:func:`read_ave_list`) with an ``annotation_row`` column.
        image_size: frame side after resizing.
        audio: log-mel front end.
        video_backend: frame decoder.
        audio_source: ``auto`` (``<id>.wav`` beside the mp4 if present, else the mp4's audio),
            ``video`` or ``wav``.
        on_decode_error: decode-error policy.
    """

    def __init__(
        self,
        root: str,
        table: pd.DataFrame,
        image_size: int,
        audio: LogMelConfig,
        video_backend: VideoBackend = "auto",
        audio_source: AudioSource = "auto",
        on_decode_error: DecodePolicy = "raise",
    ) -> None:
        super().__init__(on_decode_error)
        self.video_dir = Path(root) / VIDEO_DIR
        self.table = table.reset_index(drop=True)
        # Fixed-width unicode, not Python str objects: no refcount copy-on-read in workers.
        self.video_ids = self.table["video_id"].to_numpy(dtype=np.str_)
        self.labels = segment_labels(
            self.table["class_index"].to_numpy(), self.table["start"].to_numpy(), self.table["end"].to_numpy()
        )
        self.image_size = image_size
        self.logmel = LogMel(audio)
        self.video_backend = video_backend
        self.audio_source = audio_source
        self.frame_times = np.arange(NUM_SEGMENTS) + 0.5  # segment centres, seconds

    def __len__(self) -> int:
        return len(self.video_ids)

    def video_path(self, index: int) -> Path:
        return self.video_dir / f"{self.video_ids[index]}.mp4"

    def audio_path(self, index: int) -> Path:
        video = self.video_path(index)
        wav = video.with_suffix(".wav")
        if self.audio_source == "wav" or (self.audio_source == "auto" and wav.is_file()):
            return wav
        return video

    def load(self, index: int) -> dict[str, Any]:
        video_path = self.video_path(index)
        if not video_path.is_file():
            raise DecodeError(video_path, "video listed in the split file is missing")
        frames = read_frames(video_path, self.frame_times, backend=self.video_backend)
        audio_path = self.audio_path(index)
        wave = read_audio(audio_path, self.logmel.config.sample_rate)
        mel = self.logmel(wave, NUM_SEGMENTS, path=str(audio_path))
        return {
            "video": resize_frames(frames, self.image_size),
            "audio": torch.from_numpy(mel),
            "label": torch.from_numpy(self.labels[index].copy()),
            "video_id": str(self.video_ids[index]),
        }


class AVEDataModule(AVDataModule):
    """AVE event localisation: 10 one-second segments, 29 classes (28 events + background at index 28).

    Samples: ``video`` (10, 3, S, S) uint8, ``audio`` (10, 101, 64) float32, ``label`` (10,) int64,
    ``video_id`` str, plus ``index`` and the modality masks (see ``avmoe.datamodules.batch``).

    Args:
        root: folder holding ``Annotations.txt``, ``trainSet.txt``, ``valSet.txt``,
            ``testSet.txt`` and ``AVE/<VideoID>.mp4``.
        audio_source: ``auto`` uses ``AVE/<VideoID>.wav`` when present, else the mp4's audio
            track; ``video`` always the mp4; ``wav`` always the wav.
        **kwargs: :class:`~avmoe.datamodules.base.AVDataModule` arguments.
    """

    num_classes = NUM_CLASSES
    categories = AVE_CATEGORIES

    def __init__(self, root: str, audio_source: AudioSource = "auto", **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        if audio_source not in ("auto", "video", "wav"):
            raise ValueError(f"audio_source must be 'auto', 'video' or 'wav', got {audio_source!r}")
        self.audio_source = audio_source
        self._annotations: pd.DataFrame | None = None

    def _check_layout(self) -> Path:
        root = Path(self.root)
        expected = f"{ANNOTATIONS_FILE}, {', '.join(SPLIT_FILES.values())} and {VIDEO_DIR}/<VideoID>.mp4"
        if not root.is_dir():
            raise FileNotFoundError(f"AVE root {root} does not exist (expected a folder with {expected})")
        missing = [name for name in (ANNOTATIONS_FILE, *SPLIT_FILES.values()) if not (root / name).is_file()]
        missing += [f"{VIDEO_DIR}/"] if not (root / VIDEO_DIR).is_dir() else []
        if missing:
            raise FileNotFoundError(f"AVE root {root} lacks {', '.join(missing)} (expected {expected})")
        return root

    def annotations(self) -> pd.DataFrame:
        """Parsed ``Annotations.txt`` (read once per process)."""
        if self._annotations is None:
            path = self._check_layout() / ANNOTATIONS_FILE
            self._annotations = read_ave_list(path)
            require_rows(len(self._annotations), path, "annotation rows")
        return self._annotations

    def build_folder_dataset(self, folder: str) -> Dataset:
        files = folder_videos(folder)
        table = folder_table(files, class_index=BACKGROUND, start=0, end=0)  # no labels: all background
        return make_folder_dataset(AVEDataset, files, str(folder), table, image_size=self.image_size,
                                   audio=self.audio, video_backend=self.video_backend,
                                   audio_source=self.audio_source, on_decode_error=self.on_decode_error)

    def build_dataset(self, split: str) -> Dataset:
        root = self._check_layout()
        split_path = root / SPLIT_FILES[split]
        table = read_ave_list(split_path)
        require_rows(len(table), split_path, f"{split} rows")
        table["annotation_row"] = _annotation_rows(table, self.annotations(), split_path, root / ANNOTATIONS_FILE)
        return AVEDataset(
            str(root),
            table,
            image_size=self.image_size,
            audio=self.audio,
            video_backend=self.video_backend,
            audio_source=self.audio_source,
            on_decode_error=self.on_decode_error,
        )
