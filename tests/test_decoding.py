"""Decoders (decord / PyAV / auto fallback), audio reading and the log-mel front end, on generated media."""

from __future__ import annotations

import pickle
from pathlib import Path

import librosa
import numpy as np
import pytest

from avmoe.datamodules import DecodeError, LogMel, LogMelConfig, read_audio, read_frames
from avmoe.datamodules import decoding
from avmoe.datamodules.synthetic import write_mp4, write_wav

FPS, NUM_FRAMES, SR = 8, 24, 16000
BACKENDS = ["decord", "pyav", "auto"]
needs_decord = pytest.mark.skipif(not decoding.decord_available(), reason="decord is not installed")


def _ramp_frames(n: int = NUM_FRAMES, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame i is a flat colour whose level identifies i after lossy coding (steps of 9)."""
    level = 20 + 9 * np.arange(n)
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    frames[..., 0] = level[:, None, None]
    frames[..., 1] = 255 - level[:, None, None]
    frames[..., 2] = 90
    return frames


def _frame_ids(frames: np.ndarray) -> np.ndarray:
    return np.round((frames[..., 0].mean(axis=(1, 2)) - 20) / 9).astype(int)


def _tone(seconds: float, freq: float = 1000.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.01
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    audio = _tone(NUM_FRAMES / FPS)
    paths = {name: root / f"{name}.mp4" for name in ("ramp", "noaudio", "-dash")}
    write_mp4(paths["ramp"], _ramp_frames(), FPS, audio, SR)
    write_mp4(paths["-dash"], _ramp_frames(), FPS, audio, SR)
    write_mp4(paths["noaudio"], _ramp_frames(), FPS, None)
    paths["wav"] = root / "tone.wav"
    write_wav(paths["wav"], audio, SR)
    data = paths["ramp"].read_bytes()
    paths["junk"] = root / "junk.mp4"
    paths["junk"].write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    paths["truncated"] = root / "truncated.mp4"  # moov atom (index) is at the end: cut off
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


# ------------------------------------------------------------------------------------ video


@needs_decord
def test_decord_and_pyav_return_the_same_frames(media: dict[str, Path]) -> None:
    times = np.arange(NUM_FRAMES) / FPS + 0.5 / FPS
    a = read_frames(media["ramp"], times, backend="decord")
    b = read_frames(media["ramp"], times, backend="pyav")
    assert a.shape == b.shape == (NUM_FRAMES, 48, 64, 3) and a.dtype == b.dtype == np.uint8
    # Same H.264 bitstream, same YUV->RGB conversion: identical up to rounding in the converter.
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # Colour is approximately recoverable from the lossy stream.
    src = _ramp_frames().astype(float).mean(axis=(1, 2))
    assert np.abs(b.astype(float).mean(axis=(1, 2)) - src).max() < 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_time_rule(media: dict[str, Path], backend: str) -> None:
    if backend == "decord" and not decoding.decord_available():
        pytest.skip("decord is not installed")
    # Frame i covers [i/fps, (i+1)/fps): exact starts, just-before-next, mid-frame.
    times = [0.0, 0.999 / FPS, 1 / FPS, 2.5 / FPS, 10 / FPS, 23.99 / FPS]
    frames = read_frames(media["ramp"], times, backend=backend)  # type: ignore[arg-type]
    assert _frame_ids(frames).tolist() == [0, 0, 1, 2, 10, 23]
    # Unsorted and repeated requests come back in request order.
    frames = read_frames(media["ramp"], [2.0, 0.1, 2.0, 1.0], backend=backend)  # type: ignore[arg-type]
    assert _frame_ids(frames).tolist() == [16, 0, 16, 8]
    # Up to one frame past the end (3 s) -> last frame; further -> DecodeError naming the file.
    assert _frame_ids(read_frames(media["ramp"], [3.0 + 0.5 / FPS], backend=backend)).tolist() == [23]  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="ramp.mp4.*ends at 3.000 s"):
        read_frames(media["ramp"], [1.0, 3.0 + 1.5 / FPS], backend=backend)  # type: ignore[arg-type]


def test_bad_times_are_rejected(media: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(media["ramp"], [-0.1])
    with pytest.raises(ValueError, match="no frame times"):
        read_frames(media["ramp"], [])


@pytest.fixture(scope="module")
def av1_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AV1 mp4: decord 0.6.0 (FFmpeg 4.1) cannot open it, PyAV (dav1d) decodes it."""
    import av

    if "libsvtav1" not in av.codecs_available:
        pytest.skip("PyAV has no libsvtav1 encoder")
    path = tmp_path_factory.mktemp("av1") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "12"}
        for frame in _ramp_frames(8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


@needs_decord
def test_auto_falls_back_to_pyav_when_decord_cannot_open(av1_clip: Path) -> None:
    with pytest.raises(DecodeError, match="clip.mp4.*decord"):
        read_frames(av1_clip, [0.5], backend="decord")
    auto = read_frames(av1_clip, [0.0, 0.5], backend="auto")
    assert np.array_equal(auto, read_frames(av1_clip, [0.0, 0.5], backend="pyav"))
    assert _frame_ids(auto).tolist() == [0, 4]


def test_auto_uses_pyav_without_decord(media: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decord() -> None:
        raise ImportError("No module named 'decord'")

    monkeypatch.setattr(decoding, "_import_decord", no_decord)
    assert _frame_ids(read_frames(media["ramp"], [1.0], backend="auto")).tolist() == [8]
    with pytest.raises(ImportError):
        read_frames(media["ramp"], [1.0], backend="decord")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["junk", "truncated", "missing"])
def test_corrupt_truncated_or_missing_file_raises_decode_error(media: dict[str, Path], backend: str, name: str) -> None:
    if backend == "decord" and not decoding.decord_available():
        pytest.skip("decord is not installed")
    path = media["ramp"].with_name("missing.mp4") if name == "missing" else media[name]
    with pytest.raises(DecodeError) as info:
        read_frames(path, [0.5], backend=backend)  # type: ignore[arg-type]
    assert info.value.path == str(path) and str(path) in str(info.value) and info.value.reason


def test_truncated_stream_is_detected(tmp_path: Path) -> None:
    """A playable but short clip (1 s) asked for a frame at 2.5 s: error, never a repeated frame."""
    path = tmp_path / "short.mp4"
    write_mp4(path, _ramp_frames(FPS), FPS, None)
    for backend in ["pyav"] + (["decord"] if decoding.decord_available() else []):
        with pytest.raises(DecodeError, match="short.mp4.*ends at 1.000 s"):
            read_frames(path, [0.5, 2.5], backend=backend)  # type: ignore[arg-type]


def test_leading_dash_file_name(media: dict[str, Path]) -> None:
    assert read_frames(media["-dash"], [0.0]).shape == (1, 48, 64, 3)


def test_decode_error_pickles_and_single_argument_form() -> None:
    err = pickle.loads(pickle.dumps(DecodeError("/x/a.mp4", "bad data")))
    assert (err.path, err.reason, str(err)) == ("/x/a.mp4", "bad data", "/x/a.mp4: bad data")
    assert str(DecodeError("worker traceback text")) == "worker traceback text"


# ------------------------------------------------------------------------------------ audio


def _dominant_hz(wave: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()])


def test_audio_from_mp4_matches_wav(media: dict[str, Path]) -> None:
    sr = 32000
    from_mp4 = read_audio(media["ramp"], sr)
    from_wav = read_audio(media["wav"], sr)
    assert from_mp4.dtype == from_wav.dtype == np.float32 and from_mp4.ndim == from_wav.ndim == 1
    n = int(NUM_FRAMES / FPS * sr)
    # AAC pads to whole 1024-sample frames; the wav is exact.
    assert len(from_wav) == n and n <= len(from_mp4) <= n + 2048 * sr // SR
    a, b = from_mp4[sr // 10 : n - sr // 10], from_wav[sr // 10 : n - sr // 10]
    assert np.corrcoef(a, b)[0, 1] > 0.98  # lossy codec and two resamplers, time-aligned
    assert abs(_dominant_hz(a, sr) - 1000) < 5 and abs(_dominant_hz(b, sr) - 1000) < 5


def test_audio_native_rate_and_mono_rule(tmp_path: Path) -> None:
    tone = _tone(1.0)
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([tone, np.zeros_like(tone)], axis=1), SR)
    mono = read_audio(path, SR)  # no resampling at the native rate
    np.testing.assert_allclose(mono, tone / 2, atol=1e-4)  # mean of channels, 16-bit PCM


def test_missing_audio_stream_raises(media: dict[str, Path]) -> None:
    with pytest.raises(DecodeError, match="noaudio.mp4: the file has no audio stream"):
        read_audio(media["noaudio"], 32000)
    with pytest.raises(DecodeError, match="junk.mp4"):
        read_audio(media["junk"], 32000)
    with pytest.raises(DecodeError, match="nothere.wav: file not found"):
        read_audio(media["wav"].with_name("nothere.wav"), 32000)


# ------------------------------------------------------------------------------------ log-mel


def test_logmel_shape_and_hand_computed_librosa() -> None:
    cfg = LogMelConfig()
    wave = np.random.default_rng(0).standard_normal(10 * cfg.sample_rate).astype(np.float32) * 0.1
    out = LogMel(cfg)(wave, 10)
    assert out.shape == (10, 101, 64) and out.dtype == np.float32 and cfg.frames_per_segment == 101
    for t in (0, 7):
        seg = wave[t * 32000 : (t + 1) * 32000]
        mel = librosa.feature.melspectrogram(
            y=seg, sr=32000, n_fft=1024, hop_length=320, win_length=1024, window="hann", center=True,
            pad_mode="reflect", power=2.0, n_mels=64, fmin=50.0, fmax=14000.0, htk=False, norm="slaney",
        )
        ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
        np.testing.assert_allclose(out[t], ref, atol=1e-3)


def test_logmel_pads_within_tolerance_and_rejects_short_clips() -> None:
    logmel = LogMel(LogMelConfig(sample_rate=16000, fmax=7000.0, max_pad_seconds=0.5))
    wave = np.full(int(9.9 * 16000), 0.1, dtype=np.float32)
    out = logmel(wave, 10)
    assert out.shape == (10, 51, 64)
    assert out[9, -3:].max() == pytest.approx(-100.0)  # zero-padded tail
    with pytest.raises(DecodeError, match="clip.mp4: audio is 9.400 s long"):
        logmel(wave[: int(9.4 * 16000)], 10, path="clip.mp4")
    # Longer input is cut to T segments.
    assert logmel(np.zeros(12 * 16000, np.float32), 10).shape == (10, 51, 64)


def test_logmel_is_picklable() -> None:
    logmel = LogMel()
    _ = logmel.mel_basis
    clone = pickle.loads(pickle.dumps(logmel))
    assert clone.config == logmel.config and clone._mel_basis is None
