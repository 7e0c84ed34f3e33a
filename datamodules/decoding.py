"""Video-frame and audio decoding behind one small interface.

Backends:

* ``decord`` (x86_64 only, bundles FFmpeg 4.1): fast frame access by index; cannot open AV1. A
  ``VideoReader`` is opened per call and dropped before returning, never shared across processes
  (a reader created in the parent and used in a DataLoader worker deadlocks, dmlc/decord#294).
  Never used for audio (its stereo path is corrupt, dmlc/decord#242).
* ``pyav`` (FFmpeg 8 + dav1d): decodes sequentially and converts only the frames that are needed
  to RGB (the YUV->RGB conversion of every frame doubles the cost). Exact FFmpeg audio path.
* ``auto``: decord when it is importable and can open/decode the file, PyAV otherwise.

Frame-time rule (both backends): frame timestamps are taken relative to the first decoded frame;
frame ``i`` covers ``[pts_i, pts_{i+1})`` and the last frame covers one nominal frame duration.
The frame returned for a time ``t`` is the one whose interval contains ``t``
(``searchsorted(starts, t, "right") - 1``). A request up to one frame duration past the end of the
stream (encoder/container rounding) gets the last frame; anything later raises :class:`DecodeError`,
so a short clip is never silently padded by repeating or zero-filling frames.

Mono rule: audio from a container is downmixed by FFmpeg's resampler (``layout="mono"``; for
stereo that is ``(L + R) / sqrt(2)``), audio from a wav/flac file is the mean of its channels
``(L + R) / 2`` (as the official VGGish features). The two differ by a factor sqrt(2) on stereo
input (about 3 dB on a log-mel); mono sources are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

VideoBackend = Literal["auto", "decord", "pyav"]
SOUNDFILE_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif"})
# One decoder thread per call: DataLoader workers are the parallelism, more threads oversubscribe.
DECORD_THREADS = 1


class DecodeError(RuntimeError):
    """A media file could not be decoded as requested.

    Args:
        path: the file.
        reason: what is wrong. When empty, ``path`` is taken as the whole message (this
            single-argument form lets a DataLoader worker re-raise the error in the main process).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.reason)


# ----------------------------------------------------------------------------------------------
# frame-time rule


def frame_indices(starts: np.ndarray, frame_duration: float, times_s: np.ndarray, path: str) -> np.ndarray:
    """Map requested times to frame indices (see the module docstring for the rule).

    Args:
        starts: presentation time of every frame in seconds, ascending.
        frame_duration: nominal duration of one frame in seconds.
        times_s: requested times, seconds from the first frame.
        path: file name for error messages.

    Returns:
        int64 indices into ``starts``, aligned with ``times_s``.
    """
    if len(starts) == 0:
        raise DecodeError(path, "the video stream has no frames")
    rel = starts - starts[0]
    stream_end = float(rel[-1]) + frame_duration
    late = times_s >= stream_end + frame_duration
    if late.any():
        raise DecodeError(
            path,
            f"video stream ends at {stream_end:.3f} s ({len(starts)} frames) but a frame at "
            f"{float(times_s[late].max()):.3f} s was requested",
        )
    idx = np.searchsorted(rel, times_s, side="right") - 1
    return idx.clip(0, len(starts) - 1).astype(np.int64)


def _check_times(times_s: Sequence[float], path: str) -> np.ndarray:
    times = np.asarray(times_s, dtype=np.float64).reshape(-1)
    if times.size == 0:
        raise ValueError(f"{path}: no frame times requested")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"{path}: frame times must be finite and >= 0, got {times.tolist()}")
    return times


# ----------------------------------------------------------------------------------------------
# decord backend


def _import_decord() -> Any:
    import decord  # noqa: PLC0415 - optional, x86_64-only dependency

    return decord


def decord_available() -> bool:
    """Whether the decord backend can be imported on this machine."""
    try:
        _import_decord()
    except (ImportError, OSError):  # OSError: a wheel whose bundled FFmpeg libraries fail to load
        return False
    return True


def _read_frames_decord(path: str, times: np.ndarray) -> np.ndarray:
    decord = _import_decord()
    try:
        reader = decord.VideoReader(path, num_threads=DECORD_THREADS)
        stamps = reader.get_frame_timestamp(np.arange(len(reader))) if len(reader) else np.zeros((0, 2))
        nominal = 1.0 / max(float(reader.get_avg_fps()), 1e-6)
    except Exception as err:  # decord raises RuntimeError / DECORDError with C++ text
        raise DecodeError(path, f"decord cannot open the video stream ({_short(err)})") from err
    try:
        idx = frame_indices(stamps[:, 0], _frame_duration(stamps[:, 0], nominal, stamps), times, path)
        # get_batch wants sorted unique indices to decode forwards; scatter back to request order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        frames = reader.get_batch(uniq.tolist()).asnumpy()
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(path, f"decord failed to decode the video stream ({_short(err)})") from err
    finally:
        del reader  # close the file now, not at the next garbage collection
    return np.ascontiguousarray(frames[inverse])


def _frame_duration(starts: np.ndarray, nominal: float, stamps: np.ndarray | None = None) -> float:
    """Duration of the last frame: decord's own end stamp, else the median frame step, else 1/fps."""
    if stamps is not None and len(stamps) and stamps[-1, 1] > stamps[-1, 0]:
        return float(stamps[-1, 1] - stamps[-1, 0])
    if len(starts) > 1:
        return float(np.median(np.diff(starts)))
    return nominal


# ----------------------------------------------------------------------------------------------
# PyAV backend


def _read_frames_pyav(path: str, times: np.ndarray) -> np.ndarray:
    import av  # noqa: PLC0415 - keep import cost out of module import

    order = np.argsort(times, kind="stable")
    out: list[np.ndarray | None] = [None] * len(times)
    starts: list[float] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(path, "the file has no video stream")
            stream = container.streams.video[0]
            nominal = 1.0 / float(stream.average_rate) if stream.average_rate else 0.04
            k = 0  # next target (in sorted order) still to fill
            prev, prev_rgb = None, None
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(starts) * nominal
                starts.append(t)
                rel = t - starts[0]
                # Every pending target earlier than this frame is covered by the previous frame.
                while k < len(order) and prev is not None and times[order[k]] < rel:
                    prev_rgb = prev_rgb if prev_rgb is not None else prev.to_ndarray(format="rgb24")
                    out[order[k]] = prev_rgb
                    k += 1
                if k == len(order):
                    break
                prev, prev_rgb = frame, None
            if k < len(order):
                # The remaining targets fall on or after the last frame: validate against the end.
                last = np.asarray(starts, dtype=np.float64)
                frame_indices(last, _frame_duration(last, nominal), times[order[k:]], path)
                rgb = prev.to_ndarray(format="rgb24")
                for j in order[k:]:
                    out[j] = rgb
    except DecodeError:
        raise
    except Exception as err:  # av.FFmpegError subclasses, OSError
        raise DecodeError(path, f"PyAV failed to decode the video stream ({_short(err)})") from err
    return np.stack(out)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# public API


def read_frames(
    path: str | os.PathLike[str], times_s: Sequence[float], backend: VideoBackend = "auto"
) -> np.ndarray:
    """Decode the frames shown at ``times_s`` (seconds from the first frame).

    Args:
        path: video file.
        times_s: requested times; any order, repeats allowed.
        backend: ``"decord"``, ``"pyav"``, or ``"auto"`` (decord, falling back to PyAV when decord
            is not installed or cannot open/decode the file).

    Returns:
        ``(T, H, W, 3)`` uint8 RGB, one frame per requested time.

    Raises:
        DecodeError: missing file, no video stream, undecodable data, or a stream that ends more
            than one frame before the last requested time.
        ImportError: ``backend="decord"`` on a machine without decord.
    """
    path = str(path)
    times = _check_times(times_s, path)
    if not os.path.isfile(path):
        raise DecodeError(path, "file not found")
    if backend == "pyav":
        return _read_frames_pyav(path, times)
    if backend == "decord":
        return _read_frames_decord(path, times)
    if backend != "auto":
        raise ValueError(f"unknown video backend {backend!r}; expected 'auto', 'decord' or 'pyav'")
    if not decord_available():
        return _read_frames_pyav(path, times)
    try:
        return _read_frames_decord(path, times)
    except DecodeError as first:
        try:
            return _read_frames_pyav(path, times)
        except DecodeError as second:
            raise DecodeError(path, f"{first.reason}; fallback: {second.reason}") from second


def read_audio(path: str | os.PathLike[str], sample_rate: int) -> np.ndarray:
    """Decode a whole audio track as mono float32 at ``sample_rate``.

    wav/flac/ogg/aiff are read with soundfile, averaged over channels and resampled with
    ``librosa.resample`` (soxr_hq). Anything else is treated as a container and decoded with PyAV:
    FFmpeg resamples and downmixes (``AudioResampler(format="flt", layout="mono")``).

    Args:
        path: audio or video file.
        sample_rate: target rate in Hz.

    Returns:
        ``(S,)`` float32 waveform.

    Raises:
        DecodeError: missing file, no audio stream, or undecodable data.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DecodeError(path, "file not found")
    if Path(path).suffix.lower() in SOUNDFILE_SUFFIXES:
        return _read_audio_soundfile(path, sample_rate)
    return _read_audio_pyav(path, sample_rate)


def _read_audio_soundfile(path: str, sample_rate: int) -> np.ndarray:
    import librosa  # noqa: PLC0415
    import soundfile as sf  # noqa: PLC0415

    try:
        data, native_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile.LibsndfileError, RuntimeError
        raise DecodeError(path, f"soundfile cannot read the audio ({_short(err)})") from err
    if data.shape[1] == 0 or data.shape[0] == 0:
        raise DecodeError(path, "the audio file has no samples")
    wave = data.mean(axis=1)  # mono rule for files: mean of channels
    if native_rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _read_audio_pyav(path: str, sample_rate: int) -> np.ndarray:
    import av  # noqa: PLC0415

    chunks: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise DecodeError(path, "the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(path, f"PyAV failed to decode the audio stream ({_short(err)})") from err
    if not chunks:
        raise DecodeError(path, "the audio stream decoded to no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
