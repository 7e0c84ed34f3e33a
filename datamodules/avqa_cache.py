"""On-disk cache of the sampled frames and log-mel of each MUSIC-AVQA video.

MUSIC-AVQA splits are by question: a video carries about five questions and appears in several splits, and the
clips are 60 s long, so decoding per question and epoch multiplies the dominant cost. The cache stores, per
``video_id``, exactly what a sample needs:

* ``<video_id>.frames.npy`` ``(T, 3, S, S)`` uint8, the resized frames of the T sampled segments;
* ``<video_id>.audio.npy`` ``(T, F, M)`` float32, their log-mel.

Correctness rules:

* **Keyed by every preprocessing setting.** The entries live in ``<cache_dir>/avqa-<digest>/`` where the digest
  hashes the settings dict of the decoder (segment times, image size, log-mel parameters, video backend, the
  resolved video folder, decoder library versions, cache format). Changing any setting uses a new folder; the
  settings are written next to the entries as ``settings.json`` for inspection.
* **Atomic writes.** Each array is written to a uniquely named temporary file in the same folder and moved into
  place with ``os.replace``; the audio is committed first and the frames last, so the frames file is the commit
  marker. Concurrent writers (DataLoader workers, DDP ranks, nodes sharing a file system) at worst write the
  same entry twice; a reader never sees a partial file, and an open memory map survives a replacement.
* **Fallback.** A missing entry is decoded on the fly (and stored when the cache is on); an unreadable or
  mis-shaped entry is reported, decoded again and overwritten. Without a cache folder every access decodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .base import worker_init
from .decoding import DecodeError

CACHE_FORMAT = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


def is_cache_safe_id(video_id: str) -> bool:
    """Whether ``video_id`` can name a cache file (letters, digits, ``_ . -``; not starting with ``.``)."""
    return bool(_SAFE_ID.fullmatch(video_id)) and not video_id.startswith(".")  # fullmatch: no trailing \n


class ClipDecoder(Protocol):
    """What the cache needs from a decoder (see ``avmoe.datamodules.musicavqa.AVQAClipDecoder``)."""

    def settings(self) -> dict[str, Any]: ...

    def expected_shapes(self) -> tuple[tuple[int, ...], Optional[tuple[int, ...]]]: ...

    def decode(self, video_id: str) -> tuple[np.ndarray, np.ndarray]: ...

    def decode_frames(self, video_id: str, segments: np.ndarray) -> np.ndarray: ...


def settings_digest(settings: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable settings dict."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def atomic_save(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` through a unique temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ClipCache:
    """The cache folder of one settings dict.

    Args:
        root: parent folder (``cache_dir``); the entries go to ``root/avqa-<digest>``.
        settings: every preprocessing setting that affects the cached arrays.
        shapes: expected ``(frames, audio)`` array shapes; an entry of other shapes is treated as corrupt.
            ``None`` for the audio shape skips that check.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        settings: dict[str, Any],
        shapes: tuple[tuple[int, ...], Optional[tuple[int, ...]]],
    ) -> None:
        self.settings = settings
        self.shapes = shapes
        self.directory = Path(root) / f"avqa-{settings_digest(settings)}"
        self._ready = False

    def _prepare(self) -> None:
        if self._ready:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        info = self.directory / "settings.json"
        if not info.is_file():
            atomic_write_text(info, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")
        self._ready = True

    def paths(self, video_id: str) -> tuple[Path, Path]:
        if not is_cache_safe_id(video_id):
            raise ValueError(f"video_id {video_id!r} cannot name a cache file (allowed: letters, digits, _ . -)")
        return self.directory / f"{video_id}.frames.npy", self.directory / f"{video_id}.audio.npy"

    def has(self, video_id: str) -> bool:
        return self.paths(video_id)[0].is_file()

    def load(self, video_id: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Memory-mapped ``(frames, audio)`` of ``video_id``; None when absent or unreadable (warns)."""
        frames_path, audio_path = self.paths(video_id)
        if not frames_path.is_file():
            return None
        try:
            frames = np.load(frames_path, mmap_mode="r")
            audio = np.load(audio_path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            warnings.warn(f"AVQA cache entry {frames_path} is unreadable ({err}); decoding the video again")
            return None
        want_frames, want_audio = self.shapes
        bad = frames.shape != want_frames or frames.dtype != np.uint8 or audio.dtype != np.float32
        bad = bad or (want_audio is not None and audio.shape != want_audio)
        if bad:
            warnings.warn(
                f"AVQA cache entry {frames_path} has frames {frames.shape} {frames.dtype} / audio {audio.shape} "
                f"{audio.dtype}, expected {want_frames} uint8 / {want_audio} float32; decoding the video again"
            )
            return None
        return frames, audio

    def store(self, video_id: str, frames: np.ndarray, audio: np.ndarray) -> None:
        """Write one entry atomically (audio first, frames last: the frames file marks a complete entry)."""
        self._prepare()
        frames_path, audio_path = self.paths(video_id)
        atomic_save(audio_path, np.asarray(audio, dtype=np.float32))
        atomic_save(frames_path, np.asarray(frames, dtype=np.uint8))


class ClipStore:
    """Sampled frames and log-mel per video: from the cache when there is one, decoded otherwise.

    Picklable (DataLoader workers get a copy; nothing is opened in ``__init__``).

    Args:
        decoder: decodes the sampled segments of a video.
        cache_dir: cache parent folder, or None to decode on every access.
        keep_last: without a cache, keep the last decoded clip in memory (per process), so consecutive questions on
            one video decode it once (``predict_dir``: your own videos are never written to a cache).
    """

    def __init__(self, decoder: ClipDecoder, cache_dir: Optional[str] = None, keep_last: bool = False) -> None:
        self.decoder = decoder
        self.cache = ClipCache(cache_dir, decoder.settings(), decoder.expected_shapes()) if cache_dir else None
        self.keep_last = keep_last
        self._last: Optional[tuple[str, tuple[np.ndarray, np.ndarray]]] = None

    def clip(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(frames (T, 3, S, S) uint8, audio (T, F, M) float32)``, possibly read-only memory maps."""
        if self.cache is not None:
            entry = self.cache.load(video_id)
            if entry is not None:
                return entry
        if self._last is not None and self._last[0] == video_id:
            return self._last[1]
        frames, audio = self.decoder.decode(video_id)
        if self.cache is not None:
            self.cache.store(video_id, frames, audio)
        elif self.keep_last:
            self._last = (video_id, (frames, audio))
        return frames, audio

    def frames(self, video_id: str, segments: Sequence[int]) -> np.ndarray:
        """Frames of the given segment indices only ``(len(segments), 3, S, S)`` uint8.

        With a cache this builds the entry if needed and reads just those frames from the memory map; without
        one only the requested frames are decoded.
        """
        idx = np.asarray(segments, dtype=np.int64)
        if self.cache is None:
            return self.decoder.decode_frames(video_id, idx)
        return np.asarray(self.clip(video_id)[0][idx])

    def build(self, video_ids: Sequence[str], num_workers: int = 0) -> dict[str, str]:
        """Decode and store every video of ``video_ids`` that has no entry yet.

        Args:
            video_ids: videos to cache (duplicates are ignored).
            num_workers: DataLoader worker processes (0 = in this process).

        Returns:
            ``{video_id: reason}`` of the videos that failed to decode (nothing else is raised for them).
        """
        if self.cache is None:
            raise ValueError("ClipStore.build needs a cache folder")
        todo = [v for v in dict.fromkeys(video_ids) if not self.cache.has(v)]
        if not todo:
            return {}
        loader = DataLoader(
            _BuildJobs(self, todo), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
            worker_init_fn=worker_init if num_workers > 0 else None,
        )
        return {vid: reason for vid, reason in loader if reason}


class _BuildJobs(Dataset):
    def __init__(self, store: ClipStore, video_ids: list[str]) -> None:
        self.store = store
        self.video_ids = np.asarray(video_ids, dtype=np.str_)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> tuple[str, str]:
        vid = str(self.video_ids[i])
        try:
            self.store.clip(vid)
        except DecodeError as err:
            return vid, str(err)
        return vid, ""


def _identity(x: Any) -> Any:
    return x
