"""Write real media files (H.264 + AAC mp4, wav) for tests and smoke runs."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

AAC_FRAME = 1024  # samples per AAC frame (the encoder's frame_size)


def write_mp4(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: int,
    audio: Optional[np.ndarray] = None,
    sample_rate: int = 16000,
) -> None:
    """Write an mp4 with an H.264 (libx264, yuv420p) video stream and an optional mono AAC stream.

    Args:
        path: output file.
        frames: ``(N, H, W, 3)`` uint8 RGB; H and W must be even (yuv420p).
        fps: frame rate (frame i is shown at ``i / fps`` s).
        audio: ``(S,)`` float32 mono in [-1, 1], or None for a video-only file.
        sample_rate: audio rate in Hz.
    """
    import av  # noqa: PLC0415

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (N, H, W, 3) uint8 with even H, W; got {frames.shape}")
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=int(fps))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # ultrafast + one thread: tiny clips encode in tens of ms and stay deterministic.
        video.options = {"preset": "ultrafast", "crf": "18"}
        video.codec_context.thread_count = 1
        stream_audio = None
        if audio is not None:
            stream_audio = container.add_stream("aac", rate=int(sample_rate))
            stream_audio.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if stream_audio is not None:
            _encode_audio(container, stream_audio, np.asarray(audio, dtype=np.float32).reshape(-1), int(sample_rate))


def _encode_audio(container: object, stream: object, audio: np.ndarray, sample_rate: int) -> None:
    import av  # noqa: PLC0415

    for start in range(0, len(audio), AAC_FRAME):
        chunk = np.ascontiguousarray(audio[None, start : start + AAC_FRAME])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(stream.encode(frame))  # type: ignore[attr-defined]
    container.mux(stream.encode(None))  # type: ignore[attr-defined]


def write_wav(path: str | os.PathLike[str], audio: np.ndarray, sample_rate: int) -> None:
    """Write ``audio`` (``(S,)`` mono or ``(S, C)``) as 16-bit PCM wav."""
    import soundfile as sf  # noqa: PLC0415

    sf.write(str(path), np.asarray(audio, dtype=np.float32), int(sample_rate), subtype="PCM_16")
