"""MUSIC-AVQA (GeWu-Lab/MUSIC-AVQA) question answering from the official release.

Layout (GeWu-Lab/MUSIC-AVQA release)::

    <root>/json/avqa-{train,val,test}.json          original annotations
    <root>/json_update/avqa-{train,val,test}.json   corrected annotations (the default; ``annotations``)
    <video_root>/<video_id>.mp4                     all videos in one folder (default ``<root>/video``)

One sample = one question (row of the split file). Splits are by question, so videos are shared across splits.

Annotation parsing (schema traps, duplicate question IDs, official tokenisation and vocabularies) lives in
:mod:`avmoe.datamodules.avqa_annotations`. The official code always reads ``json/avqa-train.json`` for the
vocabularies, whatever it trains on (``vocab_dir="json"``, the default).

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

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from avmoe.metrics.avqa import QUESTION_TYPES

from .audio import LogMel, LogMelConfig
from .annotations import AnnotationError, require_rows
from .avqa_annotations import (
    MAX_QUESTION_LEN,
    PAD,
    AVQAVocab,
    DuplicatePolicy,
    apply_duplicate_policy,
    read_avqa_json,
    read_question_list,
    split_file,
    tokenize_question,
)
from .avqa_cache import ClipStore, is_cache_safe_id
from .base import SPLITS, AVDataModule, ClipDataset, DecodePolicy, resize_frames
from .decoding import DecodeError, VideoBackend, read_audio, read_frames
from .folder import folder_videos

__all__ = ["PAD", "AVQAClipDecoder", "AVQAVocab", "MusicAVQADataModule", "MusicAVQADataset", "apply_duplicate_policy",
           "read_avqa_json", "segment_starts", "split_file", "tokenize_question"]

NUM_SEGMENTS = 10
CLIP_SECONDS = 60.0
VIDEO_DIR = "video"


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
        paths: ``video_id -> file`` overriding ``<video_root>/<video_id>.mp4`` (a ``predict_dir`` of your own videos).
    """

    def __init__(
        self, video_root: str, starts: np.ndarray, image_size: int, audio: LogMelConfig, video_backend: VideoBackend,
        paths: Optional[dict[str, Path]] = None,
    ) -> None:
        self.video_root = Path(video_root)
        self.paths = paths
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
        if self.paths is not None and video_id in self.paths:
            return self.paths[video_id]
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
        predict_questions: with ``predict_dir``: a JSON list of questions in the MUSIC-AVQA format (``video_id`` = an
            mp4 file stem in ``predict_dir``, ``question_content``, ``templ_values`` for ``<...>`` placeholders) for
            ``predict`` to answer; the vocabularies are the model's (stored in its checkpoint). Each video is sampled
            as the release's (``num_segments`` over the first ``clip_seconds``), without the cache.
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
        predict_questions: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if (self.predict_dir is None) != (predict_questions is None):
            raise ValueError("AVQA predict on your own videos needs both data.predict_dir (the mp4 files) and "
                             "data.predict_questions (a JSON list of questions naming them by video_id)")
        self.predict_questions = predict_questions
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
        self._check_root()
        return split_file(self.root, self.annotations, split)

    def _check_root(self) -> None:
        if not Path(self.root).is_dir():  # before any file under it is looked for (vocabulary, split files)
            raise FileNotFoundError(f"MUSIC-AVQA root {self.root} does not exist (expected a folder with "
                                    f"{self.annotations}/avqa-{{train,val,test}}.json and {VIDEO_DIR}/)")

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
            self._check_root()
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
        if self.predict_dir is not None and self.trainer is not None and self.trainer.predicting:
            return  # your own videos are decoded on use; the release (maybe absent here) is not read
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
        path = self.split_path(split)
        require_rows(len(table), path, f"{split} questions")
        negatives = self.negatives and split == "train"
        if negatives and table["video_id"].nunique() < 2:
            raise AnnotationError(path, f"negatives=True needs questions on at least two distinct videos, got "
                                  f"{table['video_id'].nunique()} (set negatives: false to train without the match "
                                  "loss's negative frames)")
        if self.cache_dir:
            unsafe = [(row, vid) for row, vid in zip(table["row"], table["video_id"]) if not is_cache_safe_id(vid)]
            if unsafe:
                raise AnnotationError(path, f"video_id {unsafe[0][1]!r} cannot name a cache file (allowed: letters, "
                                      "digits, _ . -; not starting with '.')", int(unsafe[0][0]), "row")
        questions, answers = self.vocab.encode(table, path, self.max_question_len)
        texts = [" ".join(tokens) for tokens in table["tokens"]]
        return MusicAVQADataset(
            questions=questions,
            answers=answers,
            qtypes=table["qtype"].to_numpy(dtype=np.int64),
            question_ids=table["question_id"].to_numpy(dtype=np.int64),
            video_ids=table["video_id"].to_numpy(dtype=np.str_),
            texts=np.asarray(texts, dtype=np.str_),
            clips=self.clip_store(),
            negatives=negatives,
            negative_videos=self.negative_videos,
            on_decode_error=self.on_decode_error,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            self._adopt_model_vocab()
        _ = self.vocab  # every stage needs the vocabularies (the task reads them in its own setup)
        super().setup(stage)

    # ------------------------------------------------------------------ predict on your own videos

    def _adopt_model_vocab(self) -> None:
        """``predict_dir``: the vocabularies of the model being run (restored from ``--ckpt_path``), so the release
        root is not needed; without them (an untrained model) the root's train file must be there."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        answers, words = getattr(model, "answer_vocab", None), getattr(model, "question_vocab", None)
        if answers and words:
            self._vocab = AVQAVocab(answers=list(answers), words=list(words))
        elif not Path(self.root).is_dir():
            raise FileNotFoundError(f"AVQA predict_dir: the model has no vocabularies and the MUSIC-AVQA root "
                                    f"{self.root} does not exist; give --ckpt_path of a trained AVQA checkpoint "
                                    "(it stores them)")

    def build_folder_dataset(self, folder: str) -> Dataset:
        """The questions of ``predict_questions`` on the mp4 files of ``folder``, encoded with the vocabularies."""
        files = {p.stem: p for p in folder_videos(folder)}
        path = Path(str(self.predict_questions))
        table = read_question_list(path)
        for row, qid, vid in zip(table["row"], table["question_id"], table["video_id"]):
            if vid not in files:
                raise AnnotationError(path, f"video_id {vid!r} names no mp4 file in {folder} (expected "
                                      f"{Path(folder) / f'{vid}.mp4'})", int(row), "row", f"question_id {qid}")
        questions = self.vocab.encode_questions(table, path, self.max_question_len, "of the training vocabulary")
        decoder = AVQAClipDecoder(str(folder), segment_starts(self.num_segments, self.clip_seconds),
                                  self.image_size, self.audio, self.video_backend, paths=files)
        return MusicAVQADataset(
            questions=questions,
            answers=self.vocab.answer_indices(table["answer"]),  # -1: no (known) true answer
            qtypes=table["qtype"].to_numpy(dtype=np.int64),  # -1: no type given
            question_ids=table["question_id"].to_numpy(dtype=np.int64),
            video_ids=table["video_id"].to_numpy(dtype=np.str_),
            texts=np.asarray([" ".join(tokens) for tokens in table["tokens"]], dtype=np.str_),
            clips=ClipStore(decoder, None, keep_last=True),  # questions on one video: decoded once
            negatives=False,
            on_decode_error=self.on_decode_error,
        )
