"""AVSBench-object (OpenNLPLab/AVSBench): audio-visual segmentation, S4 (single source) and MS3 (multi-source).

Layouts under ``root`` (OpenNLPLab/AVSBench release)::

    S4:  s4_meta_data.csv                 columns by position: 0 video_name, 1 start_time, 2 category, 3 split
         s4_data/visual_frames/<split>/<category>/<video>/<video>_<1..5>.png
         s4_data/audio_wav/<split>/<category>/<video>.wav
         s4_data/gt_masks/<split>/<category>/<video>/<video>_<i>.png      train: i = 1 only; val/test: 1..5
    MS3: ms3_meta_data.csv                columns by position: 0 video_name, 1 split
         ms3_data/visual_frames/<video>/<video>.mp4_<1..5>.png            (".mp4_" in the name, no split folder)
         ms3_data/audio_wav/<split>/<video>.wav
         ms3_data/gt_masks/<split>/<video>/<video>_<1..5>.png             all five frames, every split

As the official loaders, the split is the column named ``split``, the S4 category the column named
``category`` and the video name column 0. One sample = one CSV row of the split, in CSV order.

Frames: the five 224x224 PNGs (one per second), read with PIL as RGB and kept as uint8 ``(5, 3, S, S)``
(``S = image_size``, 224 = no resampling; the backbone resizes to its own input size on the device).
Audio: ``audio_wav`` (16 kHz stereo) averaged to mono, resampled to the log-mel rate and cut into five
one-second segments (``avmoe.datamodules.audio.LogMel``). Masks: explicitly binarised, ``value > 0``
(palette index for mode ``P`` PNGs, grey level otherwise; the official loaders rely on ``convert('1')``
thresholding / palette indices 0 and 1), ``(5, 1, H, W)`` float {0, 1} with ``mask_valid`` (5,) marking the
annotated frames (unannotated frames hold zeros and must be ignored).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .annotations import AnnotationError, read_annotation_text, require_rows
from .audio import LogMel, LogMelConfig
from .base import AVDataModule, ClipDataset, DecodePolicy, resize_frames
from .decoding import DecodeError, VideoBackend, read_audio, read_frames
from .folder import FolderClips, folder_videos

Setting = Literal["s4", "ms3"]
NUM_FRAMES = 5
MASK_SIZE = 224
RELEASE_FRAME_SIZE = 224  # the released visual_frames PNGs (preprocess_{s4,ms3}.py cv2.resize to 224x224)
# preprocess_{s4,ms3}.py extract_frame_for_each_video keeps, of second l, frame int(l * fps + 15/16 * fps) (fps
# rounded): the frame shown 15/16 s into each of the first five seconds.
FRAME_OFFSET = 15 / 16
SETTINGS: tuple[str, ...] = ("s4", "ms3")
SPLIT_VALUES: tuple[str, ...] = ("train", "val", "test")
# preprocess_s4.py AVSBenchDataset: the 23 S4 categories (the MS3 CSV has none).
S4_CATEGORIES: tuple[str, ...] = (
    "baby_laughter", "female_singing", "male_speech", "dog_barking", "cat_meowing", "lions_roaring",
    "horse_clip-clop", "coyote_howling", "mynah_bird_singing", "playing_acoustic_guitar", "playing_tabla",
    "playing_violin", "playing_piano", "playing_ukulele", "playing_glockenspiel", "helicopter", "race_car",
    "driving_buses", "ambulance_siren", "typing_on_computer_keyboard", "chainsawing_trees", "cap_gun_shooting",
    "lawn_mowing",
)


def meta_csv_name(setting: str) -> str:
    return f"{setting}_meta_data.csv"


def data_dir_name(setting: str) -> str:
    return f"{setting}_data"


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"AVSBench setting must be 's4' or 'ms3', got {setting!r}")


def read_avsbench_csv(path: str | os.PathLike[str], setting: Setting) -> pd.DataFrame:
    """Parse ``s4_meta_data.csv`` / ``ms3_meta_data.csv``.

    Returns:
        DataFrame with ``video_id`` (str, column 0), ``category`` (str; S4 column ``category``, MS3 empty),
        ``split`` (str) and ``line`` (1-based line in the file, header = line 1).

    Raises:
        FileNotFoundError: no such file.
        AnnotationError: (a ``ValueError``) bytes that are not UTF-8, an empty file, a missing ``split`` /
            ``category`` column, a row whose field count differs from the header's, an empty name / category,
            an S4 category outside the 23 official ones, an S4 ``start_time`` that is not a number >= 0, or a
            split other than train/val/test; the message names the file and the line.
    """
    _check_setting(setting)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVSBench annotation file not found: {path}")
    text = read_annotation_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # the csv module handles \r\n and quotes
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise AnnotationError(path, "empty file or empty header line: expected a header with the columns "
                                  f"{_expected_columns(setting)}", 1)
        needed = ["split"] + (["category"] if setting == "s4" else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise AnnotationError(path, f"missing column(s) {missing}; header is {header}", 1)
        rows, lines = [], []
        line = reader.line_num + 1
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                if len(fields) != len(header):
                    raise AnnotationError(path, f"expected {len(header)} comma-separated fields ({', '.join(header)}),"
                                          f" got {len(fields)}: {fields}", line)
                rows.append([f.strip() for f in fields])
                lines.append(line)
            line = reader.line_num + 1
    except csv.Error as err:
        raise AnnotationError(path, f"not a readable CSV ({err})", reader.line_num) from None
    columns = list(zip(*rows)) if rows else [()] * len(header)  # by position: header names may repeat
    out = pd.DataFrame({
        "video_id": pd.Series(columns[0], dtype=object),
        "category": pd.Series(columns[header.index("category")] if setting == "s4" else [""] * len(rows),
                              dtype=object),
        "split": pd.Series(columns[header.index("split")], dtype=object),
        "line": np.asarray(lines, dtype=np.int64),
    })
    _validate_rows(out, path, setting)
    if setting == "s4" and "start_time" in header:
        _check_start_times(list(columns[header.index("start_time")]), lines, path)
    return out


def _expected_columns(setting: str) -> str:
    return "video_name, start_time, category, split" if setting == "s4" else "video_name, split"


def _check_start_times(values: list[str], lines: list[int], path: Path) -> None:
    """S4 ``start_time`` (the clip's offset in its source video; unused here): a number >= 0 or the row is wrong."""
    for value, line in zip(values, lines):
        try:
            ok = math.isfinite(float(value)) and float(value) >= 0 and value.strip() == value and "_" not in value
        except ValueError:
            ok = False
        if not ok:
            raise AnnotationError(path, f"start_time must be a number of seconds >= 0, got {value!r}", line)


def _validate_rows(table: pd.DataFrame, path: Path, setting: str) -> None:
    bad_split = ~table["split"].isin(SPLIT_VALUES)
    if bad_split.any():
        row = table[bad_split].iloc[0]
        raise AnnotationError(path, f"split must be one of {SPLIT_VALUES}, got {row['split']!r}", int(row["line"]))
    empty = table["video_id"] == ""
    if setting == "s4":
        empty |= table["category"] == ""
    if empty.any():
        row = table[empty].iloc[0]
        raise AnnotationError(path, "empty video name or category", int(row["line"]))
    if setting == "s4":
        unknown = ~table["category"].isin(S4_CATEGORIES)
        if unknown.any():
            row = table[unknown].iloc[0]
            raise AnnotationError(path, f"unknown S4 category {row['category']!r} (not one of the 23 official "
                                  "categories; it names the frame, audio and mask folders)", int(row["line"]))


def read_png_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of one frame; :class:`DecodeError` naming the file when missing or undecodable."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not path.is_file():
        raise DecodeError(path, "frame missing (expected a PNG frame here)")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DecodeError(path, f"cannot decode the frame ({type(err).__name__}: {err})") from err


def read_mask(path: Path, size: int, threshold: int = 0) -> np.ndarray:
    """Binary mask ``(size, size)`` bool: ``value > threshold`` (palette index for mode ``P``, grey otherwise).

    Raises:
        DecodeError: missing or undecodable file, or a mask that is not ``size x size``; names the file.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not path.is_file():
        raise DecodeError(path, "ground-truth mask missing")
    try:
        with Image.open(path) as img:
            if img.size != (size, size):
                raise DecodeError(path, f"mask is {img.size[0]}x{img.size[1]} (WxH), expected {size}x{size}")
            if img.mode in ("P", "1", "L", "I", "I;16", "F"):
                values = np.asarray(img)
            else:  # RGB(A), LA: grey level
                values = np.asarray(img.convert("L"))
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DecodeError(path, f"cannot decode the mask ({type(err).__name__}: {err})") from err
    return values > threshold


class AVSBenchDataset(ClipDataset):
    """One split of S4 or MS3 (see the module docstring for paths and sample contents).

    Args:
        root: folder holding ``<setting>_meta_data.csv`` and ``<setting>_data/``.
        setting: ``s4`` or ``ms3``.
        split: ``train``, ``val`` or ``test`` (folder names and the annotated-frame rule).
        table: the rows of this split (:func:`read_avsbench_csv`).
        image_size: frame side after resizing (224 keeps the official frames untouched).
        mask_size: expected mask side; other sizes are an error.
        audio: log-mel front end.
        mask_threshold: foreground is ``value > mask_threshold``.
        on_decode_error: decode-error policy.
    """

    def __init__(
        self,
        root: str,
        setting: Setting,
        split: str,
        table: pd.DataFrame,
        image_size: int = MASK_SIZE,
        mask_size: int = MASK_SIZE,
        audio: LogMelConfig = LogMelConfig(),
        mask_threshold: int = 0,
        on_decode_error: DecodePolicy = "raise",
    ) -> None:
        super().__init__(on_decode_error)
        self.data_dir = Path(root) / data_dir_name(setting)
        self.setting = setting
        self.split = split
        # Fixed-width unicode arrays, not lists of str: no copy-on-read refcount growth in workers.
        self.video_ids = table["video_id"].to_numpy(dtype=np.str_)
        self.categories = table["category"].to_numpy(dtype=np.str_)
        self.image_size = image_size
        self.mask_size = mask_size
        self.mask_threshold = mask_threshold
        self.logmel = LogMel(audio)
        # S4 train clips are annotated on the first frame only (the official one-shot setting).
        annotated = 1 if (setting == "s4" and split == "train") else NUM_FRAMES
        self.mask_valid = np.arange(NUM_FRAMES) < annotated

    def __len__(self) -> int:
        return len(self.video_ids)

    # ---- paths (official layouts) ----------------------------------------------------------------------------
    def _clip_dir(self, kind: str, index: int) -> Path:
        video, category = str(self.video_ids[index]), str(self.categories[index])
        if self.setting == "s4":
            return self.data_dir / kind / self.split / category / video
        if kind == "visual_frames":
            return self.data_dir / kind / video
        return self.data_dir / kind / self.split / video

    def frame_path(self, index: int, frame: int) -> Path:
        """Path of frame ``frame`` (0-based) of clip ``index``."""
        video = str(self.video_ids[index])
        stem = f"{video}.mp4" if self.setting == "ms3" else video
        return self._clip_dir("visual_frames", index) / f"{stem}_{frame + 1}.png"

    def mask_path(self, index: int, frame: int) -> Path:
        return self._clip_dir("gt_masks", index) / f"{self.video_ids[index]}_{frame + 1}.png"

    def audio_path(self, index: int) -> Path:
        clip = self._clip_dir("audio_wav", index)
        return clip.parent / f"{clip.name}.wav"

    # ---- loading ----------------------------------------------------------------------------------------------
    def load_frames(self, index: int) -> torch.Tensor:
        """``(5, 3, image_size, image_size)`` uint8."""
        frames = [read_png_rgb(self.frame_path(index, t)) for t in range(NUM_FRAMES)]
        first = frames[0].shape
        for t, frame in enumerate(frames):
            if frame.shape != first:
                raise DecodeError(self.frame_path(index, t), f"frame is {frame.shape[1]}x{frame.shape[0]}, "
                                  f"but frame 1 of the clip is {first[1]}x{first[0]}")
        return resize_frames(np.stack(frames), self.image_size)

    def load_masks(self, index: int) -> torch.Tensor:
        """``(5, 1, mask_size, mask_size)`` float {0, 1}; zeros on frames that are not annotated."""
        masks = np.zeros((NUM_FRAMES, 1, self.mask_size, self.mask_size), dtype=np.float32)
        for t in np.flatnonzero(self.mask_valid):
            masks[t, 0] = read_mask(self.mask_path(index, int(t)), self.mask_size, self.mask_threshold)
        return torch.from_numpy(masks)

    def load_audio(self, index: int) -> torch.Tensor:
        """``(5, frames, n_mels)`` float32 log-mel of the clip's wav."""
        path = self.audio_path(index)
        wave = read_audio(path, self.logmel.config.sample_rate)
        return torch.from_numpy(self.logmel(wave, NUM_FRAMES, path=str(path)))

    def load(self, index: int) -> dict[str, Any]:
        return {
            "video": self.load_frames(index),
            "audio": self.load_audio(index),
            "mask": self.load_masks(index),
            "mask_valid": torch.from_numpy(self.mask_valid.copy()),
            "video_id": str(self.video_ids[index]),
            "category": str(self.categories[index]),
        }


class AVSBenchFolderDataset(FolderClips, ClipDataset):
    """The mp4 files of a folder decoded as AVSBench clips (``predict_dir``: segmentation of your own videos).

    Frames: the five shown at ``l + 15/16`` s (l = 0..4; the official extraction's frame of each second), resized to
    the release's 224x224 (aspect ratio not kept, as the official ``cv2.resize``; here bicubic with antialiasing)
    and from there to ``image_size`` as the released PNGs are. Audio: the mp4's audio track (or a ``<name>.wav``
    beside it) as five 1-s log-mel segments from the start, as ``audio_wav``. A video shorter than 5 s is a
    :class:`DecodeError` naming it (policy ``on_decode_error``).

    Samples: ``video`` (5, 3, S, S) uint8, ``audio`` (5, F, M) float32, ``video_id`` (the file stem), ``category``
    (empty) and ``frame_size`` (2,) int64, the file's own (H, W); no masks.
    """

    def __init__(self, files: list[Path], image_size: int, audio: LogMelConfig, video_backend: VideoBackend = "auto",
                 on_decode_error: DecodePolicy = "raise") -> None:
        super().__init__(on_decode_error)
        self.paths = list(files)
        self.audio_source = "auto"
        self.image_size = image_size
        self.logmel = LogMel(audio)
        self.video_backend = video_backend
        self.frame_times = np.arange(NUM_FRAMES) + FRAME_OFFSET

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> dict[str, Any]:
        path = self.video_path(index)
        frames = read_frames(path, self.frame_times, backend=self.video_backend)  # (5, H, W, 3)
        release = resize_frames(frames, RELEASE_FRAME_SIZE).permute(0, 2, 3, 1).numpy()  # as the released PNGs
        audio_path = self.audio_path(index)
        wave = read_audio(audio_path, self.logmel.config.sample_rate)
        return {
            "video": resize_frames(release, self.image_size),
            "audio": torch.from_numpy(self.logmel(wave, NUM_FRAMES, path=str(audio_path))),
            "video_id": path.stem,
            "category": "",
            "frame_size": torch.tensor(frames.shape[1:3], dtype=torch.int64),
        }


class AVSBenchDataModule(AVDataModule):
    """AVSBench-object S4 / MS3 segmentation: five 1-s frames per clip with binary sound-source masks.

    Samples: ``video`` (5, 3, S, S) uint8, ``audio`` (5, F, M) float32, ``mask`` (5, 1, 224, 224) float {0, 1},
    ``mask_valid`` (5,) bool, ``video_id`` and ``category`` (S4; empty for MS3) str, plus ``index`` and the
    modality masks (``avmoe.datamodules.batch``).

    Args:
        root: folder holding ``s4_meta_data.csv`` + ``s4_data/`` (``avsbench_data/Single-source``) or
            ``ms3_meta_data.csv`` + ``ms3_data/`` (``avsbench_data/Multi-sources``).
        setting: ``s4`` (single source; train annotated on frame 1 only) or ``ms3`` (multi-source).
        image_size: frame side in the batch; 224 keeps the released frames as they are (the backbone resizes
            to its input size on the device).
        mask_size: side of the released masks (224); a mask of another size is an error naming the file.
        mask_threshold: a mask pixel is foreground when its value (palette index / grey level) exceeds this.
        **kwargs: :class:`~avmoe.datamodules.base.AVDataModule` arguments.
    """

    num_frames = NUM_FRAMES

    def __init__(
        self,
        root: str,
        setting: Setting = "s4",
        image_size: int = MASK_SIZE,
        mask_size: int = MASK_SIZE,
        mask_threshold: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, image_size=image_size, **kwargs)
        _check_setting(setting)
        self.setting = setting
        self.mask_size = mask_size
        self.mask_threshold = mask_threshold
        self._table: Optional[pd.DataFrame] = None

    def _check_layout(self) -> Path:
        root = Path(self.root)
        csv, data = meta_csv_name(self.setting), data_dir_name(self.setting)
        expected = f"{csv} and {data}/{{visual_frames,audio_wav,gt_masks}}"
        if not root.is_dir():
            raise FileNotFoundError(f"AVSBench root {root} does not exist (expected a folder with {expected})")
        missing = [] if (root / csv).is_file() else [csv]
        missing += [f"{data}/{sub}/" for sub in ("visual_frames", "audio_wav", "gt_masks")
                    if not (root / data / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"AVSBench {self.setting.upper()} root {root} lacks {', '.join(missing)} "
                                    f"(expected {expected})")
        return root

    def table(self) -> pd.DataFrame:
        """The parsed meta-data CSV (read once per process)."""
        if self._table is None:
            self._table = read_avsbench_csv(self._check_layout() / meta_csv_name(self.setting), self.setting)
        return self._table

    def build_folder_dataset(self, folder: str) -> Dataset:
        return AVSBenchFolderDataset(folder_videos(folder), image_size=self.image_size, audio=self.audio,
                                     video_backend=self.video_backend, on_decode_error=self.on_decode_error)

    def build_dataset(self, split: str) -> Dataset:
        rows = self.table()
        rows = rows[rows["split"] == split].reset_index(drop=True)
        require_rows(len(rows), self._check_layout() / meta_csv_name(self.setting), f"rows with split {split!r}")
        return AVSBenchDataset(
            str(self._check_layout()),
            self.setting,
            split,
            rows,
            image_size=self.image_size,
            mask_size=self.mask_size,
            audio=self.audio,
            mask_threshold=self.mask_threshold,
            on_decode_error=self.on_decode_error,
        )
