"""A small synthetic AVE release in the exact official layout (YapengTian/AVE-ECCV18).

Every event category ``k`` can be recovered from the sound (a pure tone, ``440 * 2**(5k/12)`` Hz,
i.e. fourths upwards, compressed geometrically below 0.4 x sample rate when there are many
classes, plus mild noise) and from the picture (a solid colour with hue ``k / num_categories``
plus mild noise). Background segments are low noise and a noisy mid-gray frame.

The release contains one VideoID used by two rows with different categories and disjoint
intervals (the last train row and the first test row), and one ``start = end = 0`` row (the first
train row), as in the official files.
"""

from __future__ import annotations

import argparse
import colorsys
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._cli import add_release_args
from ..ave import AVE_CATEGORIES, AVE_HEADER, NUM_SEGMENTS
from .media import write_mp4, write_wav

_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
EVENT_AMPLITUDE = 0.3
NOISE_EVENT, NOISE_BACKGROUND = 0.01, 0.02


def tone_frequency(k: int, num_categories: int, sample_rate: int) -> float:
    """Tone of category ``k`` in Hz (fourths from 440 Hz, kept below 0.4 x sample rate)."""
    top = min(440.0 * 2 ** (5 * (num_categories - 1) / 12), 0.4 * sample_rate)
    if num_categories == 1:
        return 440.0
    return float(440.0 * (top / 440.0) ** (k / (num_categories - 1)))


def class_colour(k: int, num_categories: int) -> np.ndarray:
    """RGB uint8 colour of category ``k`` (evenly spaced hues, saturated)."""
    r, g, b = colorsys.hsv_to_rgb(k / num_categories, 0.9, 0.9)
    return np.array([r * 255, g * 255, b * 255]).round().astype(np.uint8)


def render_clip(
    segment_class: np.ndarray, rng: np.random.Generator, num_categories: int, size: int, fps: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(10 fps, size, size, 3)`` uint8 and audio ``(10 sr,)`` float32 for per-segment classes.

    Args:
        segment_class: ``(10,)`` category per segment, -1 for background.
    """
    colours = np.full((NUM_SEGMENTS, 3), 128, dtype=np.float32)
    noise_px = np.full(NUM_SEGMENTS, 12.0, dtype=np.float32)
    freqs = np.zeros(NUM_SEGMENTS)
    for s, k in enumerate(segment_class):
        if k >= 0:
            colours[s] = class_colour(int(k), num_categories)
            noise_px[s] = 6.0
            freqs[s] = tone_frequency(int(k), num_categories, sample_rate)
    per_frame = np.repeat(np.arange(NUM_SEGMENTS), fps)
    frames = colours[per_frame][:, None, None, :] + rng.standard_normal(
        (len(per_frame), size, size, 3), dtype=np.float32
    ) * noise_px[per_frame][:, None, None, None]
    frames = frames.clip(0, 255).round().astype(np.uint8)

    per_sample = np.repeat(np.arange(NUM_SEGMENTS), sample_rate)
    t = np.arange(NUM_SEGMENTS * sample_rate) / sample_rate
    event = freqs[per_sample] > 0
    audio = np.where(event, EVENT_AMPLITUDE * np.sin(2 * np.pi * freqs[per_sample] * t), 0.0)
    audio += rng.standard_normal(len(t)) * np.where(event, NOISE_EVENT, NOISE_BACKGROUND)
    return frames, audio.astype(np.float32)


def _video_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        vid = "".join(rng.choice(_ID_ALPHABET, 11))
        if len(ids) % 5 == 1:
            vid = "-" + vid[1:]  # YouTube IDs may start with '-' (ffmpeg CLI needs ./-id.mp4)
        if vid not in seen:
            seen.add(vid)
            ids.append(vid)
    return ids


def _intervals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random [start, end) seconds; about 40 % full-length events as in the official data."""
    start = rng.integers(0, NUM_SEGMENTS, n)
    end = np.array([rng.integers(s + 1, NUM_SEGMENTS + 1) for s in start])
    full = rng.random(n) < 0.4
    start[full], end[full] = 0, NUM_SEGMENTS
    return start, end


def make_rows(
    num_train: int, num_val: int, num_test: int, num_categories: int, rng: np.random.Generator
) -> tuple[list[tuple[str, str, int, int]], dict[str, list[int]]]:
    """Rows ``(category, video_id, start, end)`` and the row positions of each split."""
    if num_train < 2 or num_test < 1 or num_val < 0:
        raise ValueError("need num_train >= 2, num_test >= 1 and num_val >= 0")
    if not 2 <= num_categories <= len(AVE_CATEGORIES):
        raise ValueError(f"num_categories must be in [2, {len(AVE_CATEGORIES)}], got {num_categories}")
    total = num_train + num_val + num_test
    cats = rng.permutation(np.arange(total) % num_categories)
    start, end = _intervals(total, rng)
    ids = _video_ids(total, rng)
    start[0] = end[0] = 0  # the official all-background row
    # Repeated VideoID: last train row and first test row, different categories, disjoint intervals.
    a, b = num_train - 1, num_train + num_val
    ids[b] = ids[a]
    cats[b] = (cats[a] + 1) % num_categories
    cut = int(rng.integers(3, 8))
    start[a], end[a], start[b], end[b] = 0, cut, cut, NUM_SEGMENTS
    rows = [(AVE_CATEGORIES[c], ids[i], int(start[i]), int(end[i])) for i, c in enumerate(cats)]
    splits = {
        "train": list(range(num_train)),
        "val": list(range(num_train, num_train + num_val)),
        "test": list(range(num_train + num_val, total)),
    }
    return rows, splits


def format_row(row: tuple[str, str, int, int]) -> str:
    category, video_id, start, end = row
    return f"{category}&{video_id}&good&{start}&{end}\n"


def write_lists(root: Path, rows: list[tuple[str, str, int, int]], splits: dict[str, list[int]],
                rng: np.random.Generator, with_header: bool = True) -> None:
    """``Annotations.txt`` (rows shuffled by ``rng``) and the three split files in its order (official layout)."""
    order = rng.permutation(len(rows))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    with open(root / "Annotations.txt", "w") as handle:
        handle.write(AVE_HEADER + "\n" if with_header else "")
        handle.writelines(format_row(rows[i]) for i in order)
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        with open(root / name, "w") as handle:
            handle.writelines(format_row(rows[i]) for i in sorted(splits[split], key=lambda i: rank[i]))


def write_ave_release(
    root: str | os.PathLike[str],
    num_train: int = 48,
    num_val: int = 12,
    num_test: int = 24,
    num_categories: int = 4,
    seed: int = 0,
    size: int = 64,
    fps: int = 8,
    sample_rate: int = 16000,
    with_header: bool = True,
    with_wav: bool = False,
) -> Path:
    """Write a synthetic AVE release under ``root`` (overwriting files of the same names).

    Args:
        root: output folder (created).
        num_train: rows in ``trainSet.txt``.
        num_val: rows in ``valSet.txt``.
        num_test: rows in ``testSet.txt``.
        num_categories: events use the first ``num_categories`` official categories.
        seed: RNG seed (the output is deterministic).
        size: frame side (even).
        fps: video frame rate.
        sample_rate: audio rate of the AAC track (and wavs).
        with_header: start ``Annotations.txt`` with the dataset-zip header line.
        with_wav: also write ``AVE/<VideoID>.wav`` (16-bit PCM) beside each mp4.

    Returns:
        ``root`` as a Path.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "AVE").mkdir(parents=True, exist_ok=True)
    rows, splits = make_rows(num_train, num_val, num_test, num_categories, rng)
    write_lists(root, rows, splits, rng, with_header)
    for video_id, segment_class in clip_contents(rows).items():
        frames, audio = render_clip(segment_class, rng, num_categories, size, fps, sample_rate)
        write_mp4(root / "AVE" / f"{video_id}.mp4", frames, fps, audio, sample_rate)
        if with_wav:
            write_wav(root / "AVE" / f"{video_id}.wav", audio, sample_rate)
    return root


def clip_contents(rows: list[tuple[str, str, int, int]]) -> dict[str, np.ndarray]:
    """Per VideoID, the category shown/heard in each segment (-1 = background; a VideoID may carry two rows)."""
    index = {name: i for i, name in enumerate(AVE_CATEGORIES)}
    clips: dict[str, np.ndarray] = {}
    for category, video_id, start, end in rows:
        seg = clips.setdefault(video_id, np.full(NUM_SEGMENTS, -1, dtype=np.int64))
        seg[start:end] = index[category]
    return clips


# ------------------------------------------------------------------------------------------------ command line


def add_ave_parser(sub: Any) -> None:
    """Register ``python -m avmoe.datamodules.synthetic ave``."""
    ave = sub.add_parser("ave", help="AVE layout: Annotations.txt, {train,val,test}Set.txt, AVE/<id>.mp4")
    add_release_args(ave, wav_help="also write AVE/<id>.wav beside each mp4")
    ave.add_argument("--no-header", action="store_true", help="write Annotations.txt without the header line")


def run_ave(args: argparse.Namespace) -> int:
    """Write the release unless ``Annotations.txt`` already exists (``--force`` rewrites)."""
    root = Path(args.root)
    if (root / "Annotations.txt").is_file() and not args.force:
        print(f"{root}: AVE release already present (Annotations.txt exists); use --force to rewrite")
        return 0
    tic = time.perf_counter()
    write_ave_release(
        root, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
        num_categories=args.num_categories, seed=args.seed, size=args.size, fps=args.fps,
        sample_rate=args.sample_rate, with_header=not args.no_header, with_wav=args.with_wav,
    )
    total = args.num_train + args.num_val + args.num_test
    print(f"{root}: wrote a synthetic AVE release ({total} rows) in {time.perf_counter() - tic:.1f} s")
    return 0
