"""A small synthetic LLP release in the exact official layout (YapengTian/AVVP-ECCV20).

Each clip holds events of 1 or 2 classes (the first ``num_categories`` LLP classes). An event is audio-visual,
audio-only or visual-only; each modality is present on one or two runs of segments, so events start and stop
within the clip. Class ``k`` sounds as a pure tone (:func:`~avmoe.datamodules.synthetic.ave.tone_frequency`;
simultaneous classes add up) and shows as a solid colour (:func:`~avmoe.datamodules.synthetic.ave.class_colour`)
filling the left (first class) or right (second class) half of the frame; the rest is noisy mid-gray.

Written files: ``AVVP_train.csv`` / ``AVVP_val_pd.csv`` / ``AVVP_test_pd.csv`` (weak labels = every class heard
or seen), ``AVVP_dataset_full.csv`` (their union), ``AVVP_eval_audio.csv`` / ``AVVP_eval_visual.csv`` (one row
per run, for val and test clips), ``LLP_dataset/video/<ID>.mp4`` (H.264 + AAC). IDs may start with '-' and
two train names carry decimal times, as in the release.

With ``with_quirks`` the release also has one of each official quirk: an orphan audio row (a mangled ID), an
audio row with ``offset <= onset``, an audio event of a class missing from the video's weak labels (really
present in the clip), and a test video without visual rows.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._cli import add_release_args
from ..llp import AUDIO_DIR, EVAL_FILES, EVAL_HEADER, LLP_CATEGORIES, NUM_SEGMENTS, SPLIT_FILES, VIDEO_DIR, WEAK_HEADER
from .ave import EVENT_AMPLITUDE, NOISE_BACKGROUND, NOISE_EVENT, class_colour, tone_frequency
from .media import write_mp4, write_wav

_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
KIND_PROBS = {"av": 0.6, "audio": 0.25, "visual": 0.15}  # LLP: most events are audio-visual


@dataclass
class Clip:
    """One synthetic video: per class, the segments where it is heard and where it is seen."""

    filename: str
    audio: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (10,) bool
    visual: dict[int, np.ndarray] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=set)  # classes left out of the weak labels (quirk)

    @property
    def classes(self) -> list[int]:
        return list(dict.fromkeys([*self.audio, *self.visual]))

    @property
    def weak_labels(self) -> list[int]:
        return [c for c in self.classes if c not in self.hidden]


def _presence(rng: np.random.Generator) -> np.ndarray:
    """(10,) bool: one run (70 %) or two disjoint runs of at least 2 segments; often not the whole clip."""
    mask = np.zeros(NUM_SEGMENTS, dtype=bool)
    if rng.random() < 0.7:
        length = int(rng.integers(3, NUM_SEGMENTS + 1))
        start = int(rng.integers(0, NUM_SEGMENTS - length + 1))
        mask[start : start + length] = True
        return mask
    cut = int(rng.integers(4, 7))
    a = int(rng.integers(0, cut - 2))
    b = int(rng.integers(cut + 1, NUM_SEGMENTS - 1))
    mask[a : int(rng.integers(a + 2, cut + 1))] = True
    mask[b : int(rng.integers(b + 2, NUM_SEGMENTS + 1))] = True
    return mask


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of a (10,) bool mask as half-open (onset, offset)."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _make_clip(filename: str, num_categories: int, rng: np.random.Generator) -> Clip:
    clip = Clip(filename)
    n_classes = 1 if num_categories < 2 or rng.random() < 0.5 else 2
    kinds = list(KIND_PROBS)
    for cls in rng.choice(num_categories, n_classes, replace=False).tolist():
        kind = kinds[int(rng.choice(len(kinds), p=list(KIND_PROBS.values())))]
        if kind in ("av", "audio"):
            clip.audio[cls] = _presence(rng)
        if kind in ("av", "visual"):
            # Audio-visual events: seen on the same segments half of the time, else on their own runs.
            same = kind == "av" and rng.random() < 0.5
            clip.visual[cls] = clip.audio[cls].copy() if same else _presence(rng)
    return clip


def _video_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        vid = "".join(rng.choice(_ID_ALPHABET, 11))
        if len(ids) % 5 == 1:
            vid = "-" + vid[1:]  # YouTube IDs may start with '-'
        if vid not in seen:
            seen.add(vid)
            ids.append(vid)
    return ids


def _filenames(ids: list[str], rng: np.random.Generator) -> list[str]:
    names = []
    for i, vid in enumerate(ids):
        start = int(rng.integers(0, 50)) * 10
        # Two train names with decimal times, as e.g. AP0061o0Nvk_101.8_111.8 in the release.
        names.append(f"{vid}_{start + 1.8:.1f}_{start + 11.8:.1f}" if i in (2, 3) else f"{vid}_{start}_{start + 10}")
    return names


def make_clips(
    num_train: int, num_val: int, num_test: int, num_categories: int, rng: np.random.Generator, with_quirks: bool
) -> dict[str, list[Clip]]:
    """The clips of each split (their content and labels)."""
    if num_train < 4 or num_val < 1 or num_test < 1:
        raise ValueError("need num_train >= 4, num_val >= 1 and num_test >= 1")
    if not 2 <= num_categories <= len(LLP_CATEGORIES):
        raise ValueError(f"num_categories must be in [2, {len(LLP_CATEGORIES)}], got {num_categories}")
    total = num_train + num_val + num_test
    names = _filenames(_video_ids(total, rng), rng)
    clips = [_make_clip(name, num_categories, rng) for name in names]
    splits = {
        "train": clips[:num_train],
        "val": clips[num_train : num_train + num_val],
        "test": clips[num_train + num_val :],
    }
    if with_quirks:
        _add_quirk_content(splits["test"][0], num_categories, rng)
    return splits


def _add_quirk_content(clip: Clip, num_categories: int, rng: np.random.Generator) -> None:
    """Test clip 0: audio-only (no visual rows) plus an audio event of a class left out of its weak labels."""
    clip.visual.clear()
    if not clip.audio:
        clip.audio[int(rng.integers(num_categories))] = _presence(rng)
    extra = next(c for c in range(num_categories) if c not in clip.audio)
    clip.audio[extra] = _presence(rng)
    clip.hidden.add(extra)


def _weak_line(clip: Clip) -> str:
    return f"{clip.filename}\t{','.join(LLP_CATEGORIES[c] for c in clip.weak_labels)}\n"


def _eval_lines(clips: list[Clip], modality: str) -> list[str]:
    lines = []
    for clip in clips:
        for cls, mask in getattr(clip, modality).items():
            lines += [f"{clip.filename}\t{on}\t{off}\t{LLP_CATEGORIES[cls]}\n" for on, off in _runs(mask)]
    return lines


def _quirk_rows(splits: dict[str, list[Clip]]) -> list[str]:
    """An orphan row (mangled ID, as ``VMTJRpjbE_150_160`` for ``1-VMTJRpjbE_150_160``) and a ``9 9`` row."""
    val = splits["val"][0]
    cls = LLP_CATEGORIES[val.classes[0]]
    return [f"{val.filename[2:]}\t0\t10\t{cls}\n", f"{val.filename}\t9\t9\t{cls}\n"]


def render_llp_clip(
    clip: Clip, rng: np.random.Generator, num_categories: int, size: int, fps: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(10 fps, size, size, 3)`` uint8 and audio ``(10 sr,)`` float32 of one clip."""
    per_frame = np.repeat(np.arange(NUM_SEGMENTS), fps)  # segment of every frame
    frames = 128.0 + rng.standard_normal((len(per_frame), size, size, 3), dtype=np.float32) * 12.0
    half = size // 2
    for slot, cls in enumerate(clip.classes[:2]):
        seen = clip.visual.get(cls)
        if seen is None:
            continue
        cols = slice(slot * half, (slot + 1) * half)
        on = seen[per_frame]  # (frames,)
        patch = class_colour(cls, num_categories).astype(np.float32) + rng.standard_normal(
            (int(on.sum()), size, half, 3), dtype=np.float32
        ) * 6.0
        frames[on, :, cols] = patch
    t = np.arange(NUM_SEGMENTS * sample_rate) / sample_rate
    per_sample = np.repeat(np.arange(NUM_SEGMENTS), sample_rate)
    audio = np.zeros_like(t)
    for cls, heard in clip.audio.items():
        tone = EVENT_AMPLITUDE * np.sin(2 * np.pi * tone_frequency(cls, num_categories, sample_rate) * t)
        audio += np.where(heard[per_sample], tone, 0.0)
    any_sound = np.any(np.stack(list(clip.audio.values())), axis=0) if clip.audio else np.zeros(NUM_SEGMENTS, bool)
    audio += rng.standard_normal(len(t)) * np.where(any_sound[per_sample], NOISE_EVENT, NOISE_BACKGROUND)
    return frames.clip(0, 255).round().astype(np.uint8), audio.astype(np.float32)


def write_llp_release(
    root: str | os.PathLike[str],
    num_train: int = 48,
    num_val: int = 12,
    num_test: int = 24,
    num_categories: int = 4,
    seed: int = 0,
    size: int = 64,
    fps: int = 8,
    sample_rate: int = 16000,
    with_quirks: bool = True,
    with_wav: bool = False,
) -> Path:
    """Write a synthetic LLP release under ``root`` (overwriting files of the same names).

    Args:
        root: output folder (created); the equivalent of the release's ``data/``.
        num_train: rows of ``AVVP_train.csv``.
        num_val: rows of ``AVVP_val_pd.csv``.
        num_test: rows of ``AVVP_test_pd.csv``.
        num_categories: events use the first ``num_categories`` LLP classes.
        seed: RNG seed (the output is deterministic).
        size: frame side (even).
        fps: video frame rate.
        sample_rate: audio rate of the AAC track (and wavs).
        with_quirks: add one instance of each official data quirk (see module docstring).
        with_wav: also write ``LLP_dataset/audio/<ID>.wav`` (16-bit PCM).

    Returns:
        ``root`` as a Path.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    splits = make_clips(num_train, num_val, num_test, num_categories, rng, with_quirks)
    for split, clips in splits.items():
        _write(root / SPLIT_FILES[split], WEAK_HEADER, [_weak_line(c) for c in clips])
    _write(root / "AVVP_dataset_full.csv", WEAK_HEADER, [_weak_line(c) for cs in splits.values() for c in cs])
    evaluated = splits["val"] + splits["test"]
    audio_rows = _eval_lines(evaluated, "audio")
    if with_quirks:
        quirks = _quirk_rows(splits)
        audio_rows = audio_rows[:1] + quirks[:1] + audio_rows[1:] + quirks[1:]
    _write(root / EVAL_FILES["audio"], EVAL_HEADER, audio_rows)
    _write(root / EVAL_FILES["visual"], EVAL_HEADER, _eval_lines(evaluated, "visual"))
    for clip in (c for cs in splits.values() for c in cs):
        frames, audio = render_llp_clip(clip, rng, num_categories, size, fps, sample_rate)
        vid = clip.filename[:11]
        write_mp4(root / VIDEO_DIR / f"{vid}.mp4", frames, fps, audio, sample_rate)
        if with_wav:
            (root / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
            write_wav(root / AUDIO_DIR / f"{vid}.wav", audio, sample_rate)
    return root


def _write(path: Path, header: tuple[str, ...], lines: list[str]) -> None:
    with open(path, "w") as handle:
        handle.write("\t".join(header) + "\n")
        handle.writelines(lines)


# ------------------------------------------------------------------------------------------------ command line


def add_llp_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``python -m avmoe.datamodules.synthetic llp``."""
    llp = sub.add_parser("llp", help="LLP layout: AVVP_*.csv (TAB-separated), LLP_dataset/video/<id>.mp4")
    add_release_args(llp, root_help="output folder (the release's data/ folder)",
                     wav_help="also write LLP_dataset/audio/<id>.wav")
    llp.add_argument("--no-quirks", action="store_true", help="leave out the official data quirks")


def run_llp(args: argparse.Namespace) -> int:
    """Write the release unless ``AVVP_train.csv`` already exists (``--force`` rewrites)."""
    root = Path(args.root)
    if (root / SPLIT_FILES["train"]).is_file() and not args.force:
        print(f"{root}: LLP release already present ({SPLIT_FILES['train']} exists); use --force to rewrite")
        return 0
    tic = time.perf_counter()
    write_llp_release(
        root, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
        num_categories=args.num_categories, seed=args.seed, size=args.size, fps=args.fps,
        sample_rate=args.sample_rate, with_quirks=not args.no_quirks, with_wav=args.with_wav,
    )
    total = args.num_train + args.num_val + args.num_test
    print(f"{root}: wrote a synthetic LLP release ({total} videos) in {time.perf_counter() - tic:.1f} s")
    return 0
