"""Audio front end: per-segment log-mel spectrograms computed in the DataLoader worker.

Matches the HTS-AT front end of AVMoE (yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py``: torchlibrosa ``Spectrogram`` +
``LogmelFilterBank``), which uses librosa's Slaney mel filters, a periodic Hann window, centred
frames with reflect padding, power 2 and ``10 log10(max(S, amin))`` with ref 1.0, amin 1e-10 and no
top_db clipping. Each segment is transformed on its own, as AVMoE feeds ``wave.view(B*T, 32000)``.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .decoding import DecodeError


# The index of the sample being loaded (set by ``ClipDataset.__getitem__``): seeds per-clip waveform transforms.
SAMPLE_INDEX: contextvars.ContextVar[int] = contextvars.ContextVar("avmoe_sample_index", default=-1)
WaveTransform = Callable[[np.ndarray, int], np.ndarray]  # (segments (T, S) float32, sample index) -> same shape


@dataclass(frozen=True)
class LogMelConfig:
    """Log-mel front end (defaults: HTS-AT AudioSet checkpoint)."""

    sample_rate: int = 32000
    """Rate the audio is decoded/resampled to, Hz."""
    n_fft: int = 1024
    """FFT size and Hann window length."""
    hop_length: int = 320
    """STFT hop in samples (101 frames per 1-s segment at 32 kHz)."""
    n_mels: int = 64
    """Number of Slaney mel bins."""
    fmin: float = 50.0
    """Lowest mel filter edge, Hz."""
    fmax: float = 14000.0
    """Highest mel filter edge, Hz."""
    segment_seconds: float = 1.0
    """Length of one segment; the clip is cut into T consecutive segments."""
    max_pad_seconds: float = 0.5
    """Largest shortfall of a clip that is zero-padded at the end; a shorter clip is an error."""

    @property
    def segment_samples(self) -> int:
        return int(round(self.segment_seconds * self.sample_rate))

    @property
    def frames_per_segment(self) -> int:
        return self.segment_samples // self.hop_length + 1  # center=True


class LogMel:
    """Waveform ``(S,)`` -> ``(T, frames, n_mels)`` float32 log-mel, one block per segment.

    The clip is cut into ``num_segments`` consecutive segments of ``segment_seconds``; samples past
    the last segment are dropped. A clip up to ``max_pad_seconds`` too short is zero-padded at the
    end: AAC priming/encoder delay and container rounding routinely make real clips a few
    milliseconds short, and the padded tail of the last segment is silence (-100 dB). A clip that is
    shorter than that raises :class:`~avmoe.datamodules.decoding.DecodeError` naming ``path``.

    Picklable (the mel basis is built lazily in each process).

    ``wave_transform`` (None by default) maps the cut segments ``(T, S)`` and the sample index
    (:data:`SAMPLE_INDEX`) to new segments before the STFT: robustness evaluation corrupts the waveform
    there (:mod:`avmoe.robustness.data`).

    Args:
        config: front-end parameters.
    """

    def __init__(self, config: LogMelConfig = LogMelConfig()) -> None:
        self.config = config
        self._mel_basis: Optional[np.ndarray] = None
        self.wave_transform: Optional[WaveTransform] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_mel_basis": None, "wave_transform": self.wave_transform}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"wave_transform": None, **state})

    @property
    def mel_basis(self) -> np.ndarray:
        if self._mel_basis is None:
            import librosa  # noqa: PLC0415

            c = self.config
            self._mel_basis = librosa.filters.mel(
                sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin, fmax=c.fmax, htk=False, norm="slaney"
            ).astype(np.float32)
        return self._mel_basis

    def segments(self, waveform: np.ndarray, num_segments: int, path: str = "<waveform>") -> np.ndarray:
        """Cut (and if allowed pad) ``waveform`` into a ``(num_segments, segment_samples)`` array."""
        c = self.config
        wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
        need = num_segments * c.segment_samples
        short = need - wave.shape[0]
        if short > int(round(c.max_pad_seconds * c.sample_rate)):
            raise DecodeError(
                path,
                f"audio is {wave.shape[0] / c.sample_rate:.3f} s long but {num_segments} segments of "
                f"{c.segment_seconds} s need {need / c.sample_rate:.3f} s (pad tolerance {c.max_pad_seconds} s)",
            )
        if short > 0:
            wave = np.concatenate([wave, np.zeros(short, dtype=np.float32)])
        return wave[:need].reshape(num_segments, c.segment_samples)

    def __call__(self, waveform: np.ndarray, num_segments: int, path: str = "<waveform>") -> np.ndarray:
        """Compute the per-segment log-mel.

        Args:
            waveform: ``(S,)`` mono samples at ``config.sample_rate``.
            num_segments: T.
            path: source file, named in the error when the clip is too short.

        Returns:
            ``(T, frames, n_mels)`` float32 (frames = 101 for 1 s at 32 kHz, hop 320).
        """
        import librosa  # noqa: PLC0415

        c = self.config
        segs = self.segments(waveform, num_segments, path)
        if self.wave_transform is not None:
            segs = self.wave_transform(segs, SAMPLE_INDEX.get())
        # librosa.stft is vectorised over leading axes: all segments in one call.
        spec = librosa.stft(
            segs, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.n_fft, window="hann", center=True, pad_mode="reflect"
        )
        power = spec.real**2 + spec.imag**2  # (T, 1 + n_fft/2, frames)
        # torch, not numpy, for the product: in a forked DataLoader worker numpy's OpenBLAS pool
        # (inherited from a parent that used it) spin-waits and can run 10-100x slower; torch runs
        # single-threaded in workers.
        power_t = torch.from_numpy(np.ascontiguousarray(power, dtype=np.float32))
        with torch.autocast("cpu", enabled=False):  # float32 even when called inside a bf16 autocast region
            mel = torch.matmul(torch.from_numpy(self.mel_basis), power_t).numpy()  # (T, n_mels, frames)
        logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
        return np.ascontiguousarray(logmel.transpose(0, 2, 1), dtype=np.float32)
