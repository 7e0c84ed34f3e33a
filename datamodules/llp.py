"""LLP (Look, Listen and Parse; YapengTian/AVVP-ECCV20) for audio-visual video parsing, from the official release.

Layout under ``root`` (the release's ``data/`` folder; YapengTian/AVVP-ECCV20), every CSV TAB-separated
with a header row::

    AVVP_train.csv AVVP_val_pd.csv AVVP_test_pd.csv   filename  event_labels   (weak labels, ','-joined)
    AVVP_eval_audio.csv AVVP_eval_visual.csv          filename  onset  offset  event_labels   (one label a row)
    LLP_dataset/video/<ID>.mp4                        10-s clips, ID = filename[:11] (may start with '-')
    LLP_dataset/audio/<ID>.wav                        optional (the official extract_audio.py output)

One sample = one row of the split CSV. Every sample has the weak video-level ``labels`` (25,); val and test
samples also have the dense ``gt_audio`` / ``gt_visual`` (25, 10) built exactly as the official evaluation:
``gt[class, onset:offset] = 1`` for every eval row whose ``filename`` equals the sample's (exact match).

Release quirks (all measured on the released CSVs) are kept as the official evaluation
treats them, counted in :attr:`LLPDataModule.quirks` and warned about once (with file:line examples):

- ``orphan_rows``: eval rows whose filename is in neither val nor test (mangled IDs): ignored;
- ``empty_rows``: eval rows with ``offset <= onset``: mark nothing;
- ``labels_not_in_weak``: eval rows whose class is not among the video's weak labels: kept as ground truth;
- ``videos_without_rows``: val/test videos without any row of a modality: all-zero ground truth.

Malformed files (bytes that are not UTF-8, an empty file, wrong header or field count, unknown class, times that
are not whole seconds in [0, 10], a filename shorter than an 11-character ID, a split or eval CSV without data
rows) raise :class:`~avmoe.datamodules.annotations.AnnotationError` (a ``ValueError``) naming the file and the
1-based line.

Frame rule: one frame per segment at its centre, ``t + 0.5`` s (the official AVMoE loader reads 10 frames
extracted at 1 fps).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from .annotations import AnnotationError, read_annotation_text, require_rows
from .audio import LogMel, LogMelConfig
from .base import AVDataModule, ClipDataset, DecodePolicy, resize_frames
from .decoding import DecodeError, VideoBackend, read_audio, read_frames
from .folder import folder_table, folder_videos, make_folder_dataset

# Official index order (dataloader.py ids_to_multinomial; main_avvp.py eval).
LLP_CATEGORIES: tuple[str, ...] = (
    "Speech",
    "Car",
    "Cheering",
    "Dog",
    "Cat",
    "Frying_(food)",
    "Basketball_bounce",
    "Fire_alarm",
    "Chainsaw",
    "Cello",
    "Banjo",
    "Singing",
    "Chicken_rooster",
    "Violin_fiddle",
    "Vacuum_cleaner",
    "Baby_laughter",
    "Accordion",
    "Lawn_mower",
    "Motorcycle",
    "Helicopter",
    "Acoustic_guitar",
    "Telephone_bell_ringing",
    "Baby_cry_infant_cry",
    "Blender",
    "Clapping",
)
NUM_CLASSES = 25
NUM_SEGMENTS = 10
ID_LENGTH = 11
SPLIT_FILES = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
EVAL_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
VIDEO_DIR = "LLP_dataset/video"
AUDIO_DIR = "LLP_dataset/audio"
WEAK_HEADER = ("filename", "event_labels")
EVAL_HEADER = ("filename", "onset", "offset", "event_labels")
AudioSource = Literal["auto", "video", "wav"]
_CLASS_INDEX = {name: i for i, name in enumerate(LLP_CATEGORIES)}
_EXAMPLES = 5
_SECONDS = re.compile(r"[0-9]{1,2}")  # ASCII digits only: int() would also take "1_0", " 3" or other scripts' digits


def llp_video_id(filename: str) -> str:
    """The video file stem of a row: the first 11 characters (the YouTube ID; may start with '-')."""
    return filename[:ID_LENGTH]


# ------------------------------------------------------------------------------------------------ parsing


def _tsv_rows(path: Path, header: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(1-based line, fields) of every non-empty data row; checks the header and the field count."""
    if not path.is_file():
        raise FileNotFoundError(f"LLP annotation file not found: {path}")
    lines = read_annotation_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines[0].strip():
        raise AnnotationError(path, f"empty file or empty first line: expected the TAB-separated header "
                              f"{chr(9).join(header)!r}", 1)
    for line_no, line in enumerate(lines, start=1):
        fields = [f.strip() for f in line.split("\t")]
        if line_no == 1:
            if tuple(fields) != header:
                raise AnnotationError(path, f"expected the TAB-separated header {chr(9).join(header)!r}, "
                                      f"got {line!r}", 1)
            continue
        if not line.strip():
            continue
        if len(fields) != len(header):
            raise AnnotationError(path, f"expected {len(header)} TAB-separated fields ({', '.join(header)}), "
                                  f"got {len(fields)}: {line!r}", line_no)
        yield line_no, fields


def _check_filename(name: str, path: Path, line_no: int) -> None:
    if len(name) < ID_LENGTH:
        raise AnnotationError(path, f"filename {name!r} is shorter than an {ID_LENGTH}-character video ID", line_no)


def _class_index(label: str, path: Path, line_no: int) -> int:
    if label not in _CLASS_INDEX:
        raise AnnotationError(path, f"unknown event label {label!r} (not one of the 25 LLP classes)", line_no)
    return _CLASS_INDEX[label]


def read_weak_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse a weak-label CSV (``AVVP_train.csv``, ``AVVP_val_pd.csv``, ``AVVP_test_pd.csv``).

    Returns:
        DataFrame with ``filename`` (str), ``video_id`` (str, ``filename[:11]``), ``label_mask`` (int64 bit
        mask over the 25 classes, bit i = class i) and ``line`` (1-based), in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: not UTF-8, no header, or a malformed row; the message names the file and the line.
    """
    path = Path(path)
    rows = []
    for line_no, (filename, labels) in _tsv_rows(path, WEAK_HEADER):
        _check_filename(filename, path, line_no)
        names = [x.strip() for x in labels.split(",")]
        if not labels or any(not x for x in names):
            raise AnnotationError(path, f"empty event label in {labels!r}", line_no)
        mask = 0
        for name in names:
            mask |= 1 << _class_index(name, path, line_no)
        rows.append((filename, llp_video_id(filename), mask, line_no))
    frame = pd.DataFrame(rows, columns=["filename", "video_id", "label_mask", "line"])
    return frame.astype({"label_mask": np.int64, "line": np.int64})


def read_eval_annotations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse a dense eval CSV (``AVVP_eval_audio.csv`` / ``AVVP_eval_visual.csv``).

    Returns:
        DataFrame with ``filename`` (str), ``onset`` / ``offset`` (int64 seconds), ``class_index`` (int64) and
        ``line`` (1-based). Rows with ``offset <= onset`` are kept (they mark nothing, as officially).

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: not UTF-8, no header, or a malformed row (times not whole seconds in [0, 10], unknown
            or several labels); the message names the file and the line.
    """
    path = Path(path)
    rows = []
    for line_no, (filename, onset_s, offset_s, label) in _tsv_rows(path, EVAL_HEADER):
        if not filename:
            raise AnnotationError(path, "empty filename", line_no)
        if not (_SECONDS.fullmatch(onset_s) and _SECONDS.fullmatch(offset_s)):
            raise AnnotationError(path, f"onset/offset must be integer seconds (ASCII digits), "
                                  f"got {onset_s!r}/{offset_s!r}", line_no)
        onset, offset = int(onset_s), int(offset_s)
        if not (0 <= onset <= NUM_SEGMENTS and 0 <= offset <= NUM_SEGMENTS):
            raise AnnotationError(path, f"onset/offset must lie in [0, {NUM_SEGMENTS}], got {onset}/{offset}",
                                  line_no)
        if "," in label:
            raise AnnotationError(path, f"eval rows carry exactly one event label, got {label!r}", line_no)
        rows.append((filename, onset, offset, _class_index(label, path, line_no), line_no))
    frame = pd.DataFrame(rows, columns=["filename", "onset", "offset", "class_index", "line"])
    return frame.astype({"onset": np.int64, "offset": np.int64, "class_index": np.int64, "line": np.int64})


def label_targets(label_mask: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Bit masks (N,) -> multi-hot (N, C) float32."""
    bits = (np.asarray(label_mask, dtype=np.int64)[:, None] >> np.arange(num_classes)) & 1
    return bits.astype(np.float32)


def dense_labels(filenames: Sequence[str], rows: pd.DataFrame) -> np.ndarray:
    """Official GT: ``(N, 25, 10)`` uint8 with ``gt[i, class, onset:offset] = 1`` for each row naming file i."""
    gt = np.zeros((len(filenames), NUM_CLASSES, NUM_SEGMENTS), dtype=np.uint8)
    position: dict[str, list[int]] = {}
    for i, name in enumerate(filenames):
        position.setdefault(name, []).append(i)
    seg = np.arange(NUM_SEGMENTS)
    for name, onset, offset, cls in rows[["filename", "onset", "offset", "class_index"]].itertuples(index=False):
        for i in position.get(name, ()):
            gt[i, cls] |= ((seg >= onset) & (seg < offset)).astype(np.uint8)
    return gt


# ------------------------------------------------------------------------------------------------ quirks


@dataclass
class QuirkReport:
    """Counts of the release quirks (see module docstring) and up to 5 ``file, line`` examples of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, where: list[str]) -> None:
        self.counts[key] = self.counts.get(key, 0) + len(where)
        self.examples.setdefault(key, []).extend(where[: _EXAMPLES - len(self.examples.get(key, []))])

    def warn(self) -> None:
        found = {k: n for k, n in self.counts.items() if n}
        if not found:
            return
        lines = [f"  {k}: {n} (e.g. {'; '.join(self.examples[k])})" for k, n in found.items()]
        rank_zero_warn(
            "LLP release quirks, handled as the official evaluation does (orphan rows ignored, offset <= onset "
            "marks nothing, labels outside the weak labels kept, videos without rows get all-zero ground truth):\n"
            + "\n".join(lines)
        )


def eval_quirks(
    modality: str, rows: pd.DataFrame, path: Path, splits: dict[str, pd.DataFrame]
) -> QuirkReport:
    """Quirks of one eval CSV against the val and test weak-label tables (``splits``: split -> table)."""
    report = QuirkReport()
    where = [f"{path.name}, line {n}" for n in rows["line"]]
    known = {name for table in splits.values() for name in table["filename"]}
    orphan = ~rows["filename"].isin(known).to_numpy()
    report.add(f"{modality}_orphan_rows", [w for w, o in zip(where, orphan) if o])
    empty = (rows["offset"] <= rows["onset"]).to_numpy()
    report.add(f"{modality}_empty_rows", [w for w, e in zip(where, empty) if e])
    weak = {n: m for table in splits.values() for n, m in zip(table["filename"], table["label_mask"])}
    outside = [
        w for w, name, cls in zip(where, rows["filename"], rows["class_index"])
        if name in weak and not (weak[name] >> int(cls)) & 1
    ]
    report.add(f"{modality}_labels_not_in_weak", outside)
    with_rows = set(rows["filename"])
    for split, table in splits.items():
        lonely = [f"{SPLIT_FILES[split]}, line {n}" for name, n in zip(table["filename"], table["line"])
                  if name not in with_rows]
        report.add(f"{split}_videos_without_{modality}_rows", lonely)
    return report


# ------------------------------------------------------------------------------------------------ dataset


class LLPDataset(ClipDataset):
    """One LLP split; metadata in numpy arrays (see module docstring).

    Args:
        root: LLP release root (the ``data/`` folder).
        table: parsed split CSV (:func:`read_weak_labels`).
        gt_audio: (N, 25, 10) uint8 dense audio ground truth, or None (train).
        gt_visual: same for the visual modality.
        image_size: frame side after resizing.
        audio: log-mel front end.
        video_backend: frame decoder.
        audio_source: ``auto`` (``LLP_dataset/audio/<ID>.wav`` if present, else the mp4), ``video`` or ``wav``.
        st_feature_dir: folder of ``<ID>.npy`` (10, D) spatio-temporal features (the release's
            ``feats/r2plus1d_18``), returned as ``visual_st``; None: not loaded.
        on_decode_error: decode-error policy.
    """

    def __init__(
        self,
        root: str,
        table: pd.DataFrame,
        gt_audio: Optional[np.ndarray],
        gt_visual: Optional[np.ndarray],
        image_size: int,
        audio: LogMelConfig,
        video_backend: VideoBackend = "auto",
        audio_source: AudioSource = "auto",
        st_feature_dir: Optional[str] = None,
        on_decode_error: DecodePolicy = "raise",
    ) -> None:
        super().__init__(on_decode_error)
        self.root = Path(root)
        # Fixed-width unicode arrays, not lists of str: no refcount copy-on-read in workers.
        self.filenames = table["filename"].to_numpy(dtype=np.str_)
        self.video_ids = table["video_id"].to_numpy(dtype=np.str_)
        self.labels = label_targets(table["label_mask"].to_numpy())
        self.gt_audio, self.gt_visual = gt_audio, gt_visual
        self.image_size = image_size
        self.logmel = LogMel(audio)
        self.video_backend = video_backend
        self.audio_source = audio_source
        self.st_feature_dir = Path(st_feature_dir) if st_feature_dir else None
        self.frame_times = np.arange(NUM_SEGMENTS) + 0.5  # segment centres, seconds

    def __len__(self) -> int:
        return len(self.filenames)

    def video_path(self, index: int) -> Path:
        return self.root / VIDEO_DIR / f"{self.video_ids[index]}.mp4"

    def audio_path(self, index: int) -> Path:
        wav = self.root / AUDIO_DIR / f"{self.video_ids[index]}.wav"
        if self.audio_source == "wav" or (self.audio_source == "auto" and wav.is_file()):
            return wav
        return self.video_path(index)

    def _st_features(self, index: int) -> torch.Tensor:
        assert self.st_feature_dir is not None
        path = self.st_feature_dir / f"{self.video_ids[index]}.npy"
        if not path.is_file():
            raise DecodeError(path, "spatio-temporal feature file is missing")
        try:
            feats = np.load(path)  # allow_pickle=False (numpy's default): a feature file cannot run code
        except (OSError, ValueError, EOFError) as err:  # truncated, not .npy, or a pickled object array
            raise DecodeError(path, f"cannot read the spatio-temporal features ({type(err).__name__}: {err})") from err
        if not isinstance(feats, np.ndarray) or feats.dtype.kind not in "fiu":
            raise DecodeError(path, f"expected a numeric .npy array, got {getattr(feats, 'dtype', type(feats))}")
        if feats.ndim != 2 or feats.shape[0] != NUM_SEGMENTS:
            raise DecodeError(path, f"expected ({NUM_SEGMENTS}, D) features, got shape {feats.shape}")
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))

    def load(self, index: int) -> dict[str, Any]:
        video_path = self.video_path(index)
        if not video_path.is_file():
            raise DecodeError(video_path, f"video of {self.filenames[index]} is missing (expected {video_path})")
        frames = read_frames(video_path, self.frame_times, backend=self.video_backend)
        audio_path = self.audio_path(index)
        wave = read_audio(audio_path, self.logmel.config.sample_rate)
        sample = {
            "video": resize_frames(frames, self.image_size),
            "audio": torch.from_numpy(self.logmel(wave, NUM_SEGMENTS, path=str(audio_path))),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "video_id": str(self.video_ids[index]),
            "filename": str(self.filenames[index]),
        }
        if self.gt_audio is not None and self.gt_visual is not None:
            sample["gt_audio"] = torch.from_numpy(self.gt_audio[index].astype(np.float32))
            sample["gt_visual"] = torch.from_numpy(self.gt_visual[index].astype(np.float32))
        if self.st_feature_dir is not None:
            sample["visual_st"] = self._st_features(index)
        return sample


class LLPDataModule(AVDataModule):
    """LLP audio-visual video parsing: 25 classes, 10 one-second segments, weak labels for training.

    Samples: ``video`` (10, 3, S, S) uint8, ``audio`` (10, 101, 64) float32, ``labels`` (25,) float32,
    ``video_id`` / ``filename`` str; val and test add ``gt_audio`` / ``gt_visual`` (25, 10) float32 {0, 1};
    with ``st_feature_dir``, ``visual_st`` (10, D) float32. Plus ``index`` and the modality masks.

    Args:
        root: the release's ``data/`` folder (``AVVP_*.csv`` and ``LLP_dataset/video/<ID>.mp4``).
        audio_source: ``auto`` uses ``LLP_dataset/audio/<ID>.wav`` when present, else the mp4's audio track;
            ``video`` always the mp4; ``wav`` always the wav.
        st_feature_dir: optional folder of ``<ID>.npy`` R(2+1)D features (10, 512) for the MGN head's
            spatio-temporal stream (relative paths are taken under ``root``); None: frames only.
        **kwargs: :class:`~avmoe.datamodules.base.AVDataModule` arguments.
    """

    num_classes = NUM_CLASSES
    categories = LLP_CATEGORIES

    def __init__(
        self, root: str, audio_source: AudioSource = "auto", st_feature_dir: Optional[str] = None, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        if audio_source not in ("auto", "video", "wav"):
            raise ValueError(f"audio_source must be 'auto', 'video' or 'wav', got {audio_source!r}")
        self.audio_source = audio_source
        self.st_feature_dir = st_feature_dir
        self.quirks: dict[str, int] = {}
        """Counts of the release quirks found in the eval CSVs (filled when val or test is built)."""
        self._eval: Optional[dict[str, pd.DataFrame]] = None

    def _check_layout(self) -> Path:
        root = Path(self.root)
        expected = f"{', '.join([*SPLIT_FILES.values(), *EVAL_FILES.values()])} and {VIDEO_DIR}/<ID>.mp4"
        if not root.is_dir():
            raise FileNotFoundError(f"LLP root {root} does not exist (expected a folder with {expected})")
        names = [*SPLIT_FILES.values(), *EVAL_FILES.values()]
        missing = [name for name in names if not (root / name).is_file()]
        missing += [f"{VIDEO_DIR}/"] if not (root / VIDEO_DIR).is_dir() else []
        if missing:
            raise FileNotFoundError(f"LLP root {root} lacks {', '.join(missing)} (expected {expected})")
        return root

    def eval_annotations(self) -> dict[str, pd.DataFrame]:
        """Parsed eval CSVs per modality (read once per process; quirks counted and warned on first read)."""
        if self._eval is None:
            root = self._check_layout()
            self._eval = {m: read_eval_annotations(root / name) for m, name in EVAL_FILES.items()}
            for modality, name in EVAL_FILES.items():
                require_rows(len(self._eval[modality]), root / name, f"{modality} event rows")
            splits = {s: read_weak_labels(root / SPLIT_FILES[s]) for s in ("val", "test")}
            report = QuirkReport()
            for modality, rows in self._eval.items():  # keys are per modality: plain merge
                sub = eval_quirks(modality, rows, root / EVAL_FILES[modality], splits)
                report.counts.update(sub.counts)
                report.examples.update(sub.examples)
            report.warn()
            self.quirks = dict(report.counts)
        return self._eval

    def build_folder_dataset(self, folder: str) -> Dataset:
        files = folder_videos(folder)
        table = folder_table(files, label_mask=0)  # no labels
        table["filename"] = table["video_id"]
        return make_folder_dataset(LLPDataset, files, str(folder), table, None, None, image_size=self.image_size,
                                   audio=self.audio, video_backend=self.video_backend,
                                   audio_source=self.audio_source, st_feature_dir=None,
                                   on_decode_error=self.on_decode_error)

    def build_dataset(self, split: str) -> Dataset:
        root = self._check_layout()
        table = read_weak_labels(root / SPLIT_FILES[split])
        require_rows(len(table), root / SPLIT_FILES[split], f"{split} videos")
        gt_audio = gt_visual = None
        if split != "train":
            rows = self.eval_annotations()
            names = table["filename"].tolist()
            gt_audio, gt_visual = dense_labels(names, rows["audio"]), dense_labels(names, rows["visual"])
        st_dir = self.st_feature_dir
        if st_dir is not None and not Path(st_dir).is_absolute():
            st_dir = str(root / st_dir)
        return LLPDataset(
            str(root),
            table,
            gt_audio,
            gt_visual,
            image_size=self.image_size,
            audio=self.audio,
            video_backend=self.video_backend,
            audio_source=self.audio_source,
            st_feature_dir=st_dir,
            on_decode_error=self.on_decode_error,
        )
