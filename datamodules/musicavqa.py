"""MUSIC-AVQA (GeWu-Lab/MUSIC-AVQA) question answering from the official release.

Layout (``reference/datasets.md`` section 1)::

    <root>/json/avqa-{train,val,test}.json          original annotations
    <root>/json_update/avqa-{train,val,test}.json   corrected annotations (the default; ``annotations``)
    <video_root>/<video_id>.mp4                     all videos in one folder (default ``<root>/video``)

One sample = one question (row of the split file). Splits are by question, so videos are shared across splits.

Schema traps handled by :func:`read_avqa_json`: the answer key is ``anser`` (``answer`` is accepted too); ``type``
and ``templ_values`` are JSON lists stored as strings; questions end in ``?`` or the full-width ``？``; a
placeholder can be glued to the question mark (``<Object>?``); the original ``json/avqa-test.json`` and
``avqa-val.json`` repeat question IDs with conflicting answers (policy ``duplicate_question_ids``: ``keep`` every
row as the official evaluation does, ``first`` keeps the first row of each ID, ``error`` refuses the file).

Vocabularies (official ``dataloader_avst.py``): answers in order of first appearance over a train file, questions
``['<pad>']`` + words in order of first appearance over the same file. The official code always reads
``json/avqa-train.json`` for this, whatever it trains on (``vocab_dir="json"``, the default).

Tokenisation (official): ``q = content.rstrip().split(' ')``; the last character of the last token is stripped
unconditionally (``?`` or ``？``); the k-th token containing ``<`` is replaced by ``templ_values[k]``; the result
is right-padded with ``<pad>`` to ``max_question_len`` (14). A longer question or a word/answer missing from the
vocabulary is an error naming the file, the row and the question ID (the official code raises too).

Sampling rule (the reference leaves "which 10 s of a 60-s video" open; this is the choice): the clip is
``clip_seconds`` long (60 for the release) and split into ``num_segments`` (10) equal strides; segment k is the
``segment_seconds`` (1 s) window starting at ``k * clip_seconds / num_segments`` (0, 6, ..., 54 s). Its audio is
that window, its frame is the one shown at the window centre (0.5, 6.5, ..., 54.5 s), so frame and audio are
aligned. This is the official feature sampling (60 one-second VGGish/ResNet steps taken ``[::6]``, frames at the
centre of each second as ``extract_frames_adaptive.py``). AVMoE's own loader takes ``linspace(1, 60, 10)`` frame
files (seconds 0, 6, 13, 19, ...), which this rule does not reproduce exactly.

Decoding is expensive (60-s videos, ~5 questions each): with ``cache_dir`` set, each video is decoded once into
:mod:`avmoe.datamodules.avqa_cache` (in ``prepare_data`` when ``build_cache``, else on first use) and every
question, epoch, split, worker and rank reads the memory-mapped entry. Without ``cache_dir`` every access decodes.

Negatives for the audio-visual match loss (train split, ``negatives=True``): T frames of other videos, drawn as the
official loader does (for each segment a random other video of the split and a random one of its sampled frames);
``negative_videos`` bounds how many distinct videos one sample touches (each frame from its own video by default;
fewer keeps on-the-fly decoding affordable without a cache).
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from avmoe.metrics.avqa import QUESTION_TYPES, qtype_index

from .audio import LogMel, LogMelConfig
from .avqa_cache import ClipStore
from .base import SPLITS, AVDataModule, ClipDataset, DecodePolicy, resize_frames
from .decoding import DecodeError, VideoBackend, read_audio, read_frames

PAD = "<pad>"
MAX_QUESTION_LEN = 14
NUM_SEGMENTS = 10
CLIP_SECONDS = 60.0
VIDEO_DIR = "video"
REQUIRED_KEYS = ("video_id", "question_id", "type", "question_content", "templ_values")
DuplicatePolicy = Literal["keep", "first", "error"]
_WARNED: set[str] = set()  # one duplicate-ID warning per file and process (prepare_data and setup both read)


def split_file(root: str | os.PathLike[str], folder: str, split: str) -> Path:
    return Path(root) / folder / f"avqa-{split}.json"


# ---------------------------------------------------------------------------------------------------------- parsing


def _json_list(value: Any, key: str, where: str) -> list[str]:
    """A list of strings stored as a string holding a JSON (or Python) list, or as a real list."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(value)  # the official code parses with literal_eval
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: {key!r} is not a list stored as a string: {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ValueError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    return parsed


def tokenize_question(content: str, templ_values: list[str], where: str = "<question>") -> list[str]:
    """Official tokenisation without padding (see the module docstring).

    Raises:
        ValueError: the number of ``<...>`` tokens differs from ``len(templ_values)``.
    """
    words = content.rstrip().split(" ")
    words[-1] = words[-1][:-1]  # the official code strips the last character unconditionally (? or ？)
    slots = [i for i, w in enumerate(words) if "<" in w]
    if len(slots) != len(templ_values):
        raise ValueError(
            f"{where}: question {content!r} has {len(slots)} placeholder(s) but templ_values has "
            f"{len(templ_values)} value(s) {templ_values}"
        )
    for i, value in zip(slots, templ_values):
        words[i] = value
    return words


def _parse_row(item: Any, path: Path, row: int) -> dict[str, Any]:
    where = f"{path}, row {row}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    qid = item.get("question_id")
    where = f"{where} (question_id {qid})" if qid is not None else where
    missing = [k for k in REQUIRED_KEYS if k not in item]
    answer_key = "anser" if "anser" in item else "answer" if "answer" in item else None
    if missing or answer_key is None:
        missing += [] if answer_key else ["anser"]
        raise ValueError(f"{where}: missing key(s) {missing} (the release spells the answer key 'anser')")
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise ValueError(f"{where}: question_id must be an integer, got {qid!r}")
    video_id = item["video_id"]
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"{where}: video_id must be a non-empty string, got {video_id!r}")
    qtype = _json_list(item["type"], "type", where)
    if len(qtype) != 2:
        raise ValueError(f"{where}: 'type' must hold [modality, type], got {item['type']!r}")
    templ = _json_list(item["templ_values"], "templ_values", where)
    content, answer = item["question_content"], item[answer_key]
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"{where}: empty or non-string question_content {content!r}")
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"{where}: empty or non-string answer {answer!r}")
    try:
        type_idx = qtype_index(*qtype)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    tokens = tokenize_question(content, templ, where)
    return {
        "row": row,
        "video_id": video_id,
        "question_id": qid,
        "qtype": type_idx,
        "question_content": content,
        "tokens": tokens,
        "answer": answer,
    }


def read_avqa_json(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse one MUSIC-AVQA annotation file.

    Returns:
        One row per JSON object, in file order, with columns ``row`` (0-based position in the file),
        ``video_id`` (str), ``question_id`` (int64), ``qtype`` (index into ``QUESTION_TYPES``),
        ``question_content`` (str), ``tokens`` (list of words, unpadded, placeholders substituted) and ``answer``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a JSON array, or a malformed row; the message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MUSIC-AVQA annotation file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of question objects, got {type(data).__name__}")
    rows = [_parse_row(item, path, i) for i, item in enumerate(data)]
    frame = pd.DataFrame(rows, columns=["row", "video_id", "question_id", "qtype", "question_content", "tokens",
                                        "answer"])
    for col in ("row", "question_id", "qtype"):
        frame[col] = frame[col].astype(np.int64)
    return frame


def apply_duplicate_policy(table: pd.DataFrame, policy: DuplicatePolicy, path: Path) -> pd.DataFrame:
    """Handle repeated ``question_id`` s (55 in the original test file, with conflicting answers)."""
    dup = table["question_id"].duplicated(keep=False).to_numpy()
    if not dup.any():
        return table
    ids = sorted(set(table.loc[dup, "question_id"].tolist()))
    listing = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
    if policy == "error":
        raise ValueError(f"{path}: {len(ids)} question_id(s) occur more than once ({listing}); "
                         "use duplicate_question_ids=keep or first, or the json_update files")
    if policy == "first":
        kept = table[~table["question_id"].duplicated(keep="first")].reset_index(drop=True)
        rank_zero_warn(f"{path}: dropped {len(table) - len(kept)} row(s) repeating a question_id ({listing})")
        return kept
    if policy != "keep":
        raise ValueError(f"duplicate_question_ids must be 'keep', 'first' or 'error', got {policy!r}")
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        rank_zero_warn(f"{path}: {len(ids)} question_id(s) occur more than once ({listing}); every row is kept "
                       "and evaluated (official behaviour). Samples are keyed by row, predictions list each row.")
    return table


# ------------------------------------------------------------------------------------------------------ vocabulary


@dataclass
class AVQAVocab:
    """Answer and question-word vocabularies (official first-appearance order)."""

    answers: list[str]
    words: list[str]

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> "AVQAVocab":
        answers = list(dict.fromkeys(table["answer"].tolist()))
        words = list(dict.fromkeys([PAD] + [w for tokens in table["tokens"] for w in tokens]))
        return cls(answers=answers, words=words)

    def encode(self, table: pd.DataFrame, path: Path, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(questions (N, max_len) int64, answers (N,) int64)``; errors name the file, row and question ID."""
        word_ix = {w: i for i, w in enumerate(self.words)}
        ans_ix = {a: i for i, a in enumerate(self.answers)}
        questions = np.zeros((len(table), max_len), dtype=np.int64)  # 0 == <pad>
        answers = np.empty(len(table), dtype=np.int64)
        for i, (row, qid, tokens, answer) in enumerate(
            zip(table["row"], table["question_id"], table["tokens"], table["answer"])
        ):
            where = f"{path}, row {row} (question_id {qid})"
            if len(tokens) > max_len:
                raise ValueError(f"{where}: question has {len(tokens)} words, more than max_question_len={max_len}")
            unknown = [w for w in tokens if w not in word_ix]
            if unknown:
                raise ValueError(f"{where}: word(s) {unknown} are not in the question vocabulary "
                                 f"({len(self.words)} words from the train file)")
            if answer not in ans_ix:
                raise ValueError(f"{where}: answer {answer!r} is not in the answer vocabulary {self.answers}")
            questions[i, : len(tokens)] = [word_ix[w] for w in tokens]
            answers[i] = ans_ix[answer]
        return questions, answers


# -------------------------------------------------------------------------------------------------------- decoding


def segment_starts(num_segments: int, clip_seconds: float) -> np.ndarray:
    """Start time (s) of each sampled segment: ``k * clip_seconds / num_segments``."""
    if num_segments < 1 or clip_seconds <= 0:
        raise ValueError(f"need num_segments >= 1 and clip_seconds > 0, got {num_segments}, {clip_seconds}")
    return np.arange(num_segments, dtype=np.float64) * (clip_seconds / num_segments)


class AVQAClipDecoder:
    """Decodes the sampled segments of one video: frames at the segment centres, log-mel of each window.

    Picklable; files are opened per call.

    Args:
        video_root: folder of ``<video_id>.mp4``.
        starts: segment start times in seconds.
        image_size: frame side after resizing.
        audio: log-mel front end (its ``segment_seconds`` is the window length).
        video_backend: frame decoder.
    """

    def __init__(
        self, video_root: str, starts: np.ndarray, image_size: int, audio: LogMelConfig, video_backend: VideoBackend
    ) -> None:
        self.video_root = Path(video_root)
        self.starts = np.asarray(starts, dtype=np.float64)
        self.image_size = image_size
        self.logmel = LogMel(audio)
        self.video_backend = video_backend
        stride = float(np.diff(self.starts).min(initial=np.inf))
        if audio.segment_seconds > stride + 1e-6:
            raise ValueError(f"segment_seconds={audio.segment_seconds} is longer than the segment stride "
                             f"{stride:.6g} s: windows would overlap")

    @property
    def frame_times(self) -> np.ndarray:
        return self.starts + self.logmel.config.segment_seconds / 2

    def video_path(self, video_id: str) -> Path:
        return self.video_root / f"{video_id}.mp4"

    def settings(self) -> dict[str, Any]:
        """Everything that changes the decoded arrays (the cache key)."""
        import av  # noqa: PLC0415
        import librosa  # noqa: PLC0415

        from .decoding import decord_available  # noqa: PLC0415

        decord_version = None
        if self.video_backend != "pyav" and decord_available():
            import decord  # noqa: PLC0415

            decord_version = decord.__version__
        return {
            "format": "avqa-frames-logmel/1",
            "video_root": str(self.video_root.resolve()),
            "segment_starts": [round(float(s), 6) for s in self.starts],
            "frame_times": [round(float(s), 6) for s in self.frame_times],
            "image_size": self.image_size,
            "resize": "bicubic-antialias-uint8",
            "logmel": asdict(self.logmel.config),
            "audio_source": "mp4 (PyAV, FFmpeg mono downmix)",
            "video_backend": self.video_backend,
            "versions": {"av": av.__version__, "decord": decord_version, "librosa": librosa.__version__},
        }

    def expected_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = self.logmel.config
        t = len(self.starts)
        return (t, 3, self.image_size, self.image_size), (t, c.frames_per_segment, c.n_mels)

    def _existing(self, video_id: str) -> str:
        path = self.video_path(video_id)
        if not path.is_file():
            raise DecodeError(path, f"video of video_id {video_id!r} is missing (expected {path})")
        return str(path)

    def decode_frames(self, video_id: str, segments: np.ndarray) -> np.ndarray:
        """Frames of the given segments, ``(len(segments), 3, S, S)`` uint8."""
        path = self._existing(video_id)
        frames = read_frames(path, self.frame_times[np.asarray(segments)], backend=self.video_backend)
        return resize_frames(frames, self.image_size).numpy()

    def decode(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(frames (T, 3, S, S) uint8, log-mel (T, F, M) float32)`` of all segments."""
        path = self._existing(video_id)
        frames = self.decode_frames(video_id, np.arange(len(self.starts)))
        wave = read_audio(path, self.logmel.config.sample_rate)
        windows = self.audio_windows(wave, path)  # (T, samples)
        return frames, self.logmel(windows.reshape(-1), len(self.starts), path=path)

    def audio_windows(self, wave: np.ndarray, path: str) -> np.ndarray:
        """Cut the segment windows; a window short by at most ``max_pad_seconds`` is zero-padded."""
        c = self.logmel.config
        size = c.segment_samples
        out = np.zeros((len(self.starts), size), dtype=np.float32)
        for k, start in enumerate(self.starts):
            s0 = int(round(start * c.sample_rate))
            piece = wave[s0 : s0 + size]
            if size - len(piece) > int(round(c.max_pad_seconds * c.sample_rate)):
                raise DecodeError(
                    path, f"audio is {len(wave) / c.sample_rate:.3f} s long but segment {k} needs "
                    f"[{start:.3f}, {start + c.segment_seconds:.3f}) s (clip_seconds too long for this video?)"
                )
            out[k, : len(piece)] = piece
        return out


# --------------------------------------------------------------------------------------------------------- dataset


class MusicAVQADataset(ClipDataset):
    """One split: per-question arrays plus a :class:`ClipStore` that yields each video's sampled segments.

    Args:
        questions: ``(N, L)`` int64 token indices.
        answers: ``(N,)`` int64 answer indices.
        qtypes: ``(N,)`` int64 question-type indices.
        question_ids: ``(N,)`` int64.
        video_ids: ``(N,)`` video IDs.
        texts: ``(N,)`` questions with placeholders substituted (for a text-model question encoder).
        clips: frames/log-mel source.
        negatives: add ``negative_video`` (T, 3, S, S) frames of other videos.
        negative_videos: at most this many distinct videos supply one sample's negative frames.
        on_decode_error: decode-error policy.
    """

    def __init__(
        self,
        questions: np.ndarray,
        answers: np.ndarray,
        qtypes: np.ndarray,
        question_ids: np.ndarray,
        video_ids: np.ndarray,
        texts: np.ndarray,
        clips: ClipStore,
        negatives: bool = False,
        negative_videos: int = NUM_SEGMENTS,
        on_decode_error: DecodePolicy = "raise",
    ) -> None:
        super().__init__(on_decode_error)
        self.questions, self.answers, self.qtypes = questions, answers, qtypes
        self.question_ids = question_ids
        # Fixed-width unicode arrays: no per-object refcounts touched (copy-on-read) in workers.
        self.video_ids = np.asarray(video_ids, dtype=np.str_)
        self.texts = np.asarray(texts, dtype=np.str_)
        self.unique_videos = np.unique(self.video_ids)
        self.clips = clips
        self.negatives = negatives
        self.negative_videos = negative_videos
        if negatives and len(self.unique_videos) < 2:
            raise ValueError("negatives need at least two distinct videos in the split")

    def __len__(self) -> int:
        return len(self.video_ids)

    def load(self, index: int) -> dict[str, Any]:
        vid = str(self.video_ids[index])
        frames, mel = self.clips.clip(vid)
        sample = {
            "video": torch.from_numpy(np.array(frames)),
            "audio": torch.from_numpy(np.array(mel)),
            "question": torch.from_numpy(self.questions[index].copy()),
            "answer": torch.tensor(self.answers[index], dtype=torch.int64),
            "qtype": torch.tensor(self.qtypes[index], dtype=torch.int64),
            "question_id": torch.tensor(self.question_ids[index], dtype=torch.int64),
            "video_id": vid,
            "question_text": str(self.texts[index]),
        }
        if self.negatives:
            sample["negative_video"] = torch.from_numpy(self.negative_frames(vid, frames.shape[0]))
        return sample

    def negative_frames(self, video_id: str, num: int) -> np.ndarray:
        """``num`` frames of other videos: frame k from video ``k % negative_videos`` of a random draw.

        Draws use torch's RNG (seeded per DataLoader worker by Lightning / PyTorch).
        """
        others = self.unique_videos[self.unique_videos != video_id]
        n_videos = max(1, min(self.negative_videos, num))
        picks = others[torch.randint(len(others), (n_videos,)).numpy()]
        segments = torch.randint(num, (num,)).numpy()
        out: list[Optional[np.ndarray]] = [None] * num
        for j, other in enumerate(picks):
            ks = np.arange(j, num, n_videos)
            frames = self.clips.frames(str(other), segments[ks])
            for k, frame in zip(ks, frames):
                out[k] = frame
        return np.stack(out)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ datamodule


class MusicAVQADataModule(AVDataModule):
    """MUSIC-AVQA: one question per sample, T sampled segments of its 60-s video.

    Samples: ``video`` (T, 3, S, S) uint8, ``audio`` (T, F, M) float32, ``question`` (L,) int64, ``answer`` ()
    int64, ``qtype`` () int64 (index into ``avmoe.metrics.avqa.QUESTION_TYPES``), ``question_id`` () int64,
    ``video_id`` str, ``question_text`` str, in the train split ``negative_video`` (T, 3, S, S) uint8, plus
    ``index`` and the modality masks.

    After ``setup`` the vocabularies are :attr:`answer_vocab` and :attr:`question_vocab` (the task reads them
    to size its embedding and classifier and stores them in its checkpoints).

    Args:
        root: folder holding the annotation folders (``json/``, ``json_update/``).
        annotations: annotation folder under ``root`` to read the splits from: ``json_update`` (corrected, no
            repeated question IDs) or ``json`` (original, as the paper-era numbers).
        vocab_dir: folder under ``root`` whose ``avqa-train.json`` defines both vocabularies; ``json`` as the
            official code (whatever it trains on); None uses ``annotations``.
        video_root: folder of ``<video_id>.mp4``; None means ``<root>/video``.
        num_segments: T sampled segments per video.
        clip_seconds: nominal video length spanned by the segments (60 for the release; a video must last
            at least until the end of the last window).
        max_question_len: questions are padded to this many words (official 14); longer is an error.
        duplicate_question_ids: ``keep`` (official: every row is a sample), ``first`` or ``error``.
        cache_dir: on-disk cache parent folder (``avmoe.datamodules.avqa_cache``); None decodes on every access.
        build_cache: with ``cache_dir``, decode every missing video in ``prepare_data`` (``num_workers``
            processes) instead of on first use.
        negatives: give train samples ``negative_video`` frames from other videos (the match loss).
        negative_videos: distinct videos per sample for those frames (official: one per frame, i.e. T).
        **kwargs: :class:`~avmoe.datamodules.base.AVDataModule` arguments.
    """

    question_types = QUESTION_TYPES

    def __init__(
        self,
        root: str,
        annotations: str = "json_update",
        vocab_dir: Optional[str] = "json",
        video_root: Optional[str] = None,
        num_segments: int = NUM_SEGMENTS,
        clip_seconds: float = CLIP_SECONDS,
        max_question_len: int = MAX_QUESTION_LEN,
        duplicate_question_ids: DuplicatePolicy = "keep",
        cache_dir: Optional[str] = None,
        build_cache: bool = True,
        negatives: bool = True,
        negative_videos: int = NUM_SEGMENTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if duplicate_question_ids not in ("keep", "first", "error"):
            raise ValueError(
                f"duplicate_question_ids must be 'keep', 'first' or 'error', got {duplicate_question_ids!r}"
            )
        if negative_videos < 1:
            raise ValueError(f"negative_videos must be >= 1, got {negative_videos}")
        self.annotations = annotations
        self.vocab_dir = vocab_dir
        self.video_root = video_root if video_root is not None else str(Path(root) / VIDEO_DIR)
        self.num_segments = num_segments
        self.clip_seconds = clip_seconds
        self.max_question_len = max_question_len
        self.duplicate_question_ids = duplicate_question_ids
        self.cache_dir = cache_dir
        self.build_cache = build_cache
        self.negatives = negatives
        self.negative_videos = negative_videos
        self._vocab: Optional[AVQAVocab] = None

    # ------------------------------------------------------------------ files and vocabularies

    def split_path(self, split: str) -> Path:
        return split_file(self.root, self.annotations, split)

    def read_split(self, split: str) -> pd.DataFrame:
        """The parsed split file after the duplicate policy (all rows; ``limit_samples`` applies later)."""
        path = self.split_path(split)
        if not path.is_file():
            raise FileNotFoundError(f"MUSIC-AVQA split file not found: {path} (expected "
                                    f"{self.annotations}/avqa-{{train,val,test}}.json under {self.root})")
        return apply_duplicate_policy(read_avqa_json(path), self.duplicate_question_ids, path)

    @property
    def vocab(self) -> AVQAVocab:
        """Vocabularies from ``<vocab_dir>/avqa-train.json`` (read once per process)."""
        if self._vocab is None:
            folder = self.vocab_dir if self.vocab_dir is not None else self.annotations
            path = split_file(self.root, folder, "train")
            if not path.is_file():
                raise FileNotFoundError(f"vocabulary file {path} not found (vocab_dir={self.vocab_dir!r}; set "
                                        "vocab_dir: null to build the vocabularies from the annotations' train file)")
            self._vocab = AVQAVocab.from_table(read_avqa_json(path))
        return self._vocab

    @property
    def answer_vocab(self) -> list[str]:
        return list(self.vocab.answers)

    @property
    def question_vocab(self) -> list[str]:
        return list(self.vocab.words)

    @property
    def num_answers(self) -> int:
        return len(self.vocab.answers)

    # ------------------------------------------------------------------ decoding and the cache

    def clip_store(self) -> ClipStore:
        decoder = AVQAClipDecoder(
            self.video_root,
            segment_starts(self.num_segments, self.clip_seconds),
            self.image_size,
            self.audio,
            self.video_backend,
        )
        return ClipStore(decoder, self.cache_dir)

    def prepare_data(self) -> None:
        """Build the cache of every video used by the (limited) splits; nothing is stored on ``self``."""
        if not (self.cache_dir and self.build_cache):
            return
        video_ids: list[str] = []
        for split in SPLITS:
            if not self.split_path(split).is_file():
                continue
            table = self.read_split(split)
            if self.limit_samples is not None:
                table = table.iloc[: self.limit_samples]
            video_ids += table["video_id"].tolist()
        store = self.clip_store()
        failed = store.build(video_ids, num_workers=self.num_workers)
        if failed:
            listing = "; ".join(f"{reason}" for reason in list(failed.values())[:10])
            if self.on_decode_error == "raise":
                raise DecodeError(f"{len(failed)} video(s) failed to decode while building the AVQA cache: {listing}")
            rank_zero_warn(f"AVQA cache: {len(failed)} video(s) failed to decode and will be skipped: {listing}")

    # ------------------------------------------------------------------ datasets

    def build_dataset(self, split: str) -> Dataset:
        table = self.read_split(split)
        questions, answers = self.vocab.encode(table, self.split_path(split), self.max_question_len)
        texts = [" ".join(tokens) for tokens in table["tokens"]]
        return MusicAVQADataset(
            questions=questions,
            answers=answers,
            qtypes=table["qtype"].to_numpy(dtype=np.int64),
            question_ids=table["question_id"].to_numpy(dtype=np.int64),
            video_ids=table["video_id"].to_numpy(dtype=np.str_),
            texts=np.asarray(texts, dtype=np.str_),
            clips=self.clip_store(),
            negatives=self.negatives and split == "train",
            negative_videos=self.negative_videos,
            on_decode_error=self.on_decode_error,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        _ = self.vocab  # every stage needs the vocabularies (the task reads them in its own setup)
        super().setup(stage)
