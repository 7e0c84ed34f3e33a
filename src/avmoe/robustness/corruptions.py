"""Input corruptions for robustness evaluation: audio in waveform space, video in pixel space.

Both are applied *before* the model's own preprocessing: audio before the log-mel front end (in the DataLoader
worker, see :mod:`avmoe.robustness.data`), video on the uint8 frames before the ImageNet normalisation. Every
function takes one clip and a :class:`torch.Generator` (see :func:`clip_generator`), so a clip's draw depends only
on ``(seed, sample index)``: identical across methods, runs, workers and DDP ranks.

Constants and sources:

- Audio white noise at a target SNR: ``y = x + a n``, ``a = sqrt(||x||^2 / ||n||^2 * 10^(-SNR/10))`` (the rule of
  torchaudio ``functional.add_noise``), n white Gaussian; severities 1-5 use the AVRobustBench synthetic-noise SNRs
  ``NOISE_SNRS = [40, 30, 20, 10, 0]`` dB (Maharana et al., arXiv 2506.00358, ``corruptions/corruptions.py``; their
  ``gaussian_audio`` passes the severity integer itself as the SNR, we use the table).
- Audio low-pass: 6th-order Butterworth with cutoffs [8000, 6000, 4000, 2000, 1000] Hz (AVRobustBench
  "compression"), applied causally (``scipy.signal.sosfilt``).
- Video: ImageNet-C (Hendrycks & Dietterich, ICLR 2019; ``hendrycks/robustness``
  ``ImageNet-C/imagenet_c/imagenet_c/corruptions.py``) Gaussian noise sigma [.08, .12, .18, .26, .38], Gaussian
  blur sigma [1, 2, 3, 4, 6] px (tuned for 224 px: scaled by ``H / 224`` here), JPEG quality [25, 18, 15, 10, 7],
  contrast [.4, .3, .2, .1, .05]; occlusion is ``RandomErasing`` (Zhong et al., arXiv 1708.04896) with p = 1,
  value 0, aspect ratio log-uniform in (0.3, 3.3) and a fixed area fraction per severity ``OCCLUSION_AREAS``
  (our choice: 0.1 ... 0.5). One draw per clip: the same noise field shape / rectangle parameters for the clip's
  frames come from one generator (AVRobustBench samples per frame; a clip-level draw keeps frames consistent).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NOISE_SNRS = (40.0, 30.0, 20.0, 10.0, 0.0)  # dB, severity 1..5 (AVRobustBench)
LOWPASS_CUTOFFS = (8000.0, 6000.0, 4000.0, 2000.0, 1000.0)  # Hz, severity 1..5 (AVRobustBench)
LOWPASS_ORDER = 6
GAUSSIAN_NOISE_SIGMAS = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C gaussian_noise
GAUSSIAN_BLUR_SIGMAS = (1.0, 2.0, 3.0, 4.0, 6.0)  # ImageNet-C gaussian_blur, px at 224 px
JPEG_QUALITIES = (25, 18, 15, 10, 7)  # ImageNet-C jpeg_compression
CONTRAST_FACTORS = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C contrast
OCCLUSION_AREAS = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of the frame erased (our levels)
IMAGENET_C_SIZE = 224

AUDIO_CORRUPTIONS = ("white_noise", "lowpass")
VISUAL_CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "occlusion")
SALTS = {"missing": 1, "missing_which": 2, "audio": 3, "visual": 4}  # one independent stream per use


def clip_generator(seed: int, index: int, use: str) -> torch.Generator:
    """CPU generator for one clip and one use (``SALTS``), a function of ``(seed, index, use)`` only."""
    state = np.random.SeedSequence([int(seed), int(index), SALTS[use]]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _level(table: tuple, severity: int, name: str):
    if not 1 <= int(severity) <= len(table):
        raise ValueError(f"{name}: severity must be in 1..{len(table)}, got {severity}")
    return table[int(severity) - 1]


# ------------------------------------------------------------------------------------------------------- audio
def snr_db(clean: Tensor, noisy: Tensor) -> float:
    """Measured SNR of ``noisy`` against ``clean`` in dB: ``10 log10(||x||^2 / ||y - x||^2)``."""
    noise = (noisy.double() - clean.double()).pow(2).sum()
    return float(10 * torch.log10(clean.double().pow(2).sum() / noise))


def white_noise(wave: Tensor, snr: float, generator: torch.Generator) -> Tensor:
    """Add white Gaussian noise at ``snr`` dB over the whole clip. wave (..., S) float -> same shape.

    A silent clip (zero energy) has no defined SNR and is returned unchanged.
    """
    noise = torch.randn(wave.shape, generator=generator, dtype=torch.float64)
    x = wave.double()
    energy = x.pow(2).sum()
    if energy == 0:
        return wave.clone()
    scale = torch.sqrt(energy / noise.pow(2).sum() * 10 ** (-snr / 10))
    return (x + scale * noise).to(wave.dtype)


def lowpass(wave: Tensor, cutoff_hz: float, sample_rate: int, order: int = LOWPASS_ORDER) -> Tensor:
    """Causal Butterworth low-pass along the last axis. wave (..., S) float -> same shape."""
    from scipy.signal import butter, sosfilt  # noqa: PLC0415 - scipy comes with librosa

    if not 0 < cutoff_hz < sample_rate / 2:
        raise ValueError(f"lowpass cutoff {cutoff_hz} Hz must lie in (0, {sample_rate / 2}) at {sample_rate} Hz")
    sos = butter(order, cutoff_hz, btype="low", fs=sample_rate, output="sos")
    return torch.from_numpy(sosfilt(sos, wave.double().numpy(), axis=-1)).to(wave.dtype)


def corrupt_audio(wave: Tensor, name: str, severity: int, generator: torch.Generator, sample_rate: int,
                  snr: float | None = None) -> Tensor:
    """One clip's waveform (..., S) corrupted by ``name`` (``AUDIO_CORRUPTIONS``) at ``severity`` 1-5.

    ``snr`` overrides the severity's SNR for ``white_noise``.
    """
    if name == "white_noise":
        return white_noise(wave, _level(NOISE_SNRS, severity, name) if snr is None else snr, generator)
    if name == "lowpass":
        return lowpass(wave, _level(LOWPASS_CUTOFFS, severity, name), sample_rate)
    raise ValueError(f"unknown audio corruption {name!r}; expected one of {AUDIO_CORRUPTIONS}")


# ------------------------------------------------------------------------------------------------------- video
def _to_float(frames: Tensor) -> Tensor:
    if frames.dtype != torch.uint8:
        raise TypeError(f"visual corruptions take uint8 frames (T, 3, H, W), got {frames.dtype}")
    return frames.float() / 255.0


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_noise(frames: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """ImageNet-C Gaussian noise. frames (T, 3, H, W) uint8 -> uint8."""
    sigma = _level(GAUSSIAN_NOISE_SIGMAS, severity, "gaussian_noise")
    x = _to_float(frames)
    return _to_uint8(x + sigma * torch.randn(x.shape, generator=generator).to(x.device))


def gaussian_kernel(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(4 sigma)`` (scipy's default truncation)."""
    radius = max(1, int(np.ceil(4 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(frames: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C Gaussian blur, sigma scaled from 224 px to the frame height. (T, 3, H, W) uint8 -> uint8."""
    sigma = _level(GAUSSIAN_BLUR_SIGMAS, severity, "gaussian_blur") * frames.shape[-2] / IMAGENET_C_SIZE
    x = _to_float(frames)
    k = gaussian_kernel(sigma).to(x.device)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    # Separable, edge-replicating padding (scipy/skimage "nearest").
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return _to_uint8(x)


def jpeg(frames: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C JPEG compression (PIL encoder) at the severity's quality. (T, 3, H, W) uint8 -> uint8."""
    from PIL import Image  # noqa: PLC0415

    quality = _level(JPEG_QUALITIES, severity, "jpeg")
    out = []
    for frame in frames.permute(0, 2, 3, 1).cpu().numpy():  # (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(frames.device)


def contrast(frames: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C contrast: ``(x - mean) c + mean`` with the mean over each frame. (T, 3, H, W) uint8 -> uint8."""
    c = _level(CONTRAST_FACTORS, severity, "contrast")
    x = _to_float(frames)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8((x - mean) * c + mean)


def occlusion_box(height: int, width: int, area: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomErasing-style rectangle ``(top, left, h, w)`` of ``area`` of the frame, log-uniform aspect ratio."""
    log_ratio = torch.empty(1).uniform_(np.log(0.3), np.log(3.3), generator=generator).item()
    ratio = float(np.exp(log_ratio))
    target = area * height * width
    h = int(round(np.sqrt(target * ratio)))
    w = int(round(np.sqrt(target / ratio)))
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    if h == height:  # keep the area when one side saturates
        w = min(width, max(1, int(round(target / h))))
    if w == width:
        h = min(height, max(1, int(round(target / w))))
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    return top, left, h, w


def occlusion(frames: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Black rectangle of the severity's area fraction, the same on every frame of the clip. uint8 -> uint8."""
    area = _level(OCCLUSION_AREAS, severity, "occlusion")
    top, left, h, w = occlusion_box(frames.shape[-2], frames.shape[-1], area, generator)
    out = frames.clone()
    out[..., top:top + h, left:left + w] = 0
    return out


VISUAL_FUNCTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "jpeg": jpeg, "contrast": contrast,
    "occlusion": occlusion,
}


def corrupt_video(frames: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """One clip's frames (T, 3, H, W) uint8 corrupted by ``name`` (``VISUAL_CORRUPTIONS``) at ``severity`` 1-5."""
    if name not in VISUAL_FUNCTIONS:
        raise ValueError(f"unknown visual corruption {name!r}; expected one of {VISUAL_CORRUPTIONS}")
    return VISUAL_FUNCTIONS[name](frames, severity, generator)
