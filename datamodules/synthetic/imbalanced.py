"""A synthetic AVE release where one modality carries the label reliably and the other only weakly.

Same on-disk format, rows and class signals as :mod:`avmoe.datamodules.synthetic.ave` (so
:class:`~avmoe.datamodules.ave.AVEDataModule` reads it unchanged): a hue per category in the picture, a tone per
category in the sound, background elsewhere. What differs is per clip:

- the **dominant** modality renders the event class at full strength, except on a ``blank_fraction`` of clips
  where it shows nothing but background (no class and no event evidence);
- the **weak** modality renders the event faintly (``weak_contrast``: a hue blended toward gray under heavy
  pixel noise, or a quiet tone under loud noise, the same noise on its background segments so that only the
  faint signal marks the event), and only on a ``weak_reliability`` fraction of clips with the true class; on
  the others it shows a random other class.

The easy, reliable dominant modality is learnt first and the joint loss then has little left to push the weak
one: plain training under-trains it, which shows as low uni-modal accuracy of the weak modality and as errors
on the blank clips, where only the weak modality can tell the class. The default dominant modality is the
picture: with frozen random tiny encoders a hue survives mean pooling as a linear feature while a tone's pitch
is mostly lost (pooling discards where the line sits in the spectrogram), so the picture is the naturally
dominant modality at that scale (``dominant="audio"`` gives the reverse construction).
The per-clip ground truth is written to ``imbalance.csv`` (``video_id,dominant_blank,weak_reliable``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._cli import add_release_args
from ..ave import NUM_SEGMENTS
from .ave import (
    EVENT_AMPLITUDE,
    NOISE_BACKGROUND,
    NOISE_EVENT,
    class_colour,
    clip_contents,
    make_rows,
    tone_frequency,
    write_lists,
)
from .media import write_mp4, write_wav

Modality = Literal["audio", "visual"]
GRAY = 128.0
PIXEL_NOISE_STRONG, PIXEL_NOISE_WEAK, PIXEL_NOISE_BACKGROUND = 6.0, 48.0, 12.0
AUDIO_NOISE_WEAK = 0.08


def render_frames(segment_class: np.ndarray, rng: np.random.Generator, num_categories: int, size: int, fps: int,
                  contrast: float) -> np.ndarray:
    """``(10 fps, size, size, 3)`` uint8: hue of the class per segment (-1: noisy gray background).

    ``contrast`` < 1 blends the hue toward gray and raises the pixel noise of every frame (the weak picture: the
    noise level must not give the event away, only the faint hue does).
    """
    weak = contrast < 1
    colours = np.full((NUM_SEGMENTS, 3), GRAY, dtype=np.float32)
    noise = np.full(NUM_SEGMENTS, PIXEL_NOISE_WEAK if weak else PIXEL_NOISE_BACKGROUND, dtype=np.float32)
    for s, k in enumerate(segment_class):
        if k >= 0:
            colours[s] = GRAY + contrast * (class_colour(int(k), num_categories).astype(np.float32) - GRAY)
            noise[s] = PIXEL_NOISE_WEAK if weak else PIXEL_NOISE_STRONG
    per_frame = np.repeat(np.arange(NUM_SEGMENTS), fps)
    frames = colours[per_frame][:, None, None, :] + rng.standard_normal(
        (len(per_frame), size, size, 3), dtype=np.float32
    ) * noise[per_frame][:, None, None, None]
    return frames.clip(0, 255).round().astype(np.uint8)


def render_audio(segment_class: np.ndarray, rng: np.random.Generator, num_categories: int, sample_rate: int,
                 contrast: float) -> np.ndarray:
    """``(10 sr,)`` float32: the class tone per segment (-1: low noise).

    ``contrast`` < 1: a quiet tone under loud noise, the same noise on background segments (weak sound).
    """
    freqs = np.array([tone_frequency(int(k), num_categories, sample_rate) if k >= 0 else 0.0
                      for k in segment_class])
    per_sample = np.repeat(np.arange(NUM_SEGMENTS), sample_rate)
    t = np.arange(NUM_SEGMENTS * sample_rate) / sample_rate
    event = freqs[per_sample] > 0
    tone = contrast * EVENT_AMPLITUDE * np.sin(2 * np.pi * freqs[per_sample] * t)
    if contrast < 1:
        noise = np.full(len(t), AUDIO_NOISE_WEAK)
    else:
        noise = np.where(event, NOISE_EVENT, NOISE_BACKGROUND)
    audio = np.where(event, tone, 0.0) + rng.standard_normal(len(t)) * noise
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _corrupt(segment_class: np.ndarray, rng: np.random.Generator, num_categories: int) -> np.ndarray:
    """Replace each event class of the clip by a random *other* class (same segments)."""
    out = segment_class.copy()
    for k in np.unique(segment_class[segment_class >= 0]):
        out[segment_class == k] = (k + rng.integers(1, num_categories)) % num_categories
    return out


def write_imbalanced_ave_release(
    root: str | os.PathLike[str],
    dominant: Modality = "visual",
    blank_fraction: float = 0.25,
    weak_reliability: float = 0.75,
    weak_contrast: float = 0.3,
    num_train: int = 64,
    num_val: int = 16,
    num_test: int = 48,
    num_categories: int = 4,
    seed: int = 0,
    size: int = 64,
    fps: int = 4,
    sample_rate: int = 16000,
    with_wav: bool = False,
) -> Path:
    """Write an imbalanced synthetic AVE release under ``root`` (deterministic for a seed).

    Args:
        root: output folder (created; files of the same names are overwritten).
        dominant: the modality that carries the label reliably (``audio`` or ``visual``).
        blank_fraction: fraction of clips whose dominant modality shows only background.
        weak_reliability: fraction of clips whose weak modality shows the true class (else another class).
        weak_contrast: strength of the weak modality's event signal in (0, 1].
        num_train: rows in ``trainSet.txt``.
        num_val: rows in ``valSet.txt``.
        num_test: rows in ``testSet.txt``.
        num_categories: events use the first ``num_categories`` official categories.
        seed: RNG seed.
        size: frame side (even).
        fps: video frame rate.
        sample_rate: audio rate of the AAC track (and wavs).
        with_wav: also write ``AVE/<VideoID>.wav`` beside each mp4.

    Returns:
        ``root`` as a Path.
    """
    if dominant not in ("audio", "visual"):
        raise ValueError(f"dominant must be 'audio' or 'visual', got {dominant!r}")
    for name, value in (("blank_fraction", blank_fraction), ("weak_reliability", weak_reliability)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if not 0.0 < weak_contrast <= 1.0:
        raise ValueError(f"weak_contrast must lie in (0, 1], got {weak_contrast}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "AVE").mkdir(parents=True, exist_ok=True)
    rows, splits = make_rows(num_train, num_val, num_test, num_categories, rng)
    write_lists(root, rows, splits, rng)
    flags = []
    for video_id, segment_class in clip_contents(rows).items():
        blank = bool(rng.random() < blank_fraction)
        reliable = bool(rng.random() < weak_reliability)
        strong_classes = np.full_like(segment_class, -1) if blank else segment_class
        weak_classes = segment_class if reliable else _corrupt(segment_class, rng, num_categories)
        audio_classes, visual_classes = (strong_classes, weak_classes) if dominant == "audio" else (
            weak_classes, strong_classes)
        frames = render_frames(visual_classes, rng, num_categories, size, fps,
                               1.0 if dominant == "visual" else weak_contrast)
        audio = render_audio(audio_classes, rng, num_categories, sample_rate,
                             1.0 if dominant == "audio" else weak_contrast)
        write_mp4(root / "AVE" / f"{video_id}.mp4", frames, fps, audio, sample_rate)
        if with_wav:
            write_wav(root / "AVE" / f"{video_id}.wav", audio, sample_rate)
        flags.append(f"{video_id},{int(blank)},{int(reliable)}\n")
    with open(root / "imbalance.csv", "w") as handle:
        handle.write(f"# dominant={dominant} blank_fraction={blank_fraction} weak_reliability={weak_reliability} "
                     f"weak_contrast={weak_contrast}\nvideo_id,dominant_blank,weak_reliable\n")
        handle.writelines(flags)
    return root


def add_imbalanced_parser(sub: Any) -> None:
    """Register ``python -m avmoe.datamodules.synthetic ave_imbalanced``."""
    p = sub.add_parser("ave_imbalanced", help="AVE layout; one modality reliable, the other weak (balancing benches)")
    add_release_args(p, num_train=64, num_val=16, num_test=48, fps=4,
                     wav_help="also write AVE/<id>.wav beside each mp4")
    p.add_argument("--dominant", choices=("audio", "visual"), default="visual")
    p.add_argument("--blank-fraction", type=float, default=0.25)
    p.add_argument("--weak-reliability", type=float, default=0.75)
    p.add_argument("--weak-contrast", type=float, default=0.3)


def run_imbalanced(args: argparse.Namespace) -> int:
    """Write the release unless ``imbalance.csv`` already exists (``--force`` rewrites)."""
    root = Path(args.root)
    if (root / "imbalance.csv").is_file() and not args.force:
        print(f"{root}: imbalanced AVE release already present (imbalance.csv exists); use --force to rewrite")
        return 0
    tic = time.perf_counter()
    write_imbalanced_ave_release(
        root, dominant=args.dominant, blank_fraction=args.blank_fraction, weak_reliability=args.weak_reliability,
        weak_contrast=args.weak_contrast, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
        num_categories=args.num_categories, seed=args.seed, size=args.size, fps=args.fps,
        sample_rate=args.sample_rate, with_wav=args.with_wav,
    )
    total = args.num_train + args.num_val + args.num_test
    print(f"{root}: wrote an imbalanced synthetic AVE release ({total} rows, dominant {args.dominant}) "
          f"in {time.perf_counter() - tic:.1f} s")
    return 0
