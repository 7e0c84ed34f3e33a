"""Small synthetic AVSBench-object releases (S4 and MS3) in the exact official layouts.

Every clip shows coloured shapes on a noisy grey background; an object of kind ``k`` has its own colour (hue
``k / num_categories``), shape (disc, square, diamond by ``k % 3``) and sound (a pure tone, fourths upwards from
440 Hz, as the synthetic AVE release). The ground-truth mask of a frame is the visible pixels of the objects
*sounding* in that second, so the task needs the audio:

- **S4**: one sounding object per clip (the row's category, audible for all 5 s) drifting across the frames;
  with probability ``distractor_prob`` a silent object of another kind is also shown (never in the mask).
  Train clips get the first mask only, val/test all five (the official one-shot setting).
- **MS3**: two objects of different kinds, each audible in a random subset of the five seconds (at least two);
  the mask of second ``t`` is the union of the objects audible then, so it can be empty (the first test clip
  always has a silent first second). All five masks in every split.

Files: PNG frames (224x224 by default) and masks (S4: grey 0/255; MS3: palette indices 0/1, to exercise
both binarisation paths), 16-bit 16 kHz *stereo* wavs (the right channel is the left at 0.8x plus its own
noise) and the meta-data CSV with the rows of the three splits interleaved.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..avsbench import NUM_FRAMES, S4_CATEGORIES, data_dir_name, meta_csv_name
from .ave import class_colour, tone_frequency
from .media import write_wav

_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
TONE_AMPLITUDE = 0.25
AUDIO_NOISE = 0.01


@dataclass
class SceneObject:
    """One shape: kind, centre per frame (5, 2) in pixels (x, y), radius in pixels, audible seconds (5,) bool."""

    kind: int
    centres: np.ndarray
    radius: float
    audible: np.ndarray


def shape_mask(kind: int, centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    """``(size, size)`` bool pixels of the shape of ``kind`` (disc, square, diamond by ``kind % 3``)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - centre[0], yy - centre[1]
    if kind % 3 == 0:
        return dx**2 + dy**2 <= radius**2
    if kind % 3 == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    return np.abs(dx) + np.abs(dy) <= 1.2 * radius


RADIUS_RANGE = (0.15, 0.28)
"""Object radius as a fraction of the frame side (objects cover roughly 5-25 % of a frame, as in AVSBench)."""


def _random_object(kind: int, audible: np.ndarray, size: int, rng: np.random.Generator,
                   others: tuple[SceneObject, ...] = ()) -> SceneObject:
    """A shape of ``kind`` drifting over the frames, placed (by rejection, 20 tries) to overlap ``others`` little."""
    radius = float(rng.uniform(*RADIUS_RANGE) * size)
    for _ in range(20):
        start = rng.uniform(radius, size - radius, 2)
        if all(np.linalg.norm(start - o.centres[0]) > 0.9 * (radius + o.radius) for o in others):
            break
    drift = rng.uniform(-0.04, 0.04, 2) * size  # per frame
    centres = start[None] + np.arange(NUM_FRAMES)[:, None] * drift[None]
    return SceneObject(kind, centres.clip(radius, size - radius), radius, audible)


def render_scene(
    objects: list[SceneObject], num_categories: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(5, size, size, 3)`` uint8 and masks ``(5, size, size)`` bool (visible audible pixels).

    Objects are painted in list order (later ones on top); a pixel is in the mask when the object painted
    last on it is audible in that second.
    """
    grey = float(rng.uniform(100, 160))
    frames = grey + rng.standard_normal((NUM_FRAMES, size, size, 3), dtype=np.float32) * 10.0
    owner = np.full((NUM_FRAMES, size, size), -1, dtype=np.int64)
    for i, obj in enumerate(objects):
        colour = class_colour(obj.kind, num_categories).astype(np.float32)
        for t in range(NUM_FRAMES):
            pix = shape_mask(obj.kind, obj.centres[t], obj.radius, size)
            frames[t][pix] = colour + rng.standard_normal((int(pix.sum()), 3), dtype=np.float32) * 6.0
            owner[t][pix] = i
    audible = np.stack([obj.audible for obj in objects], axis=1) if objects else np.zeros((NUM_FRAMES, 0), bool)
    masks = np.zeros((NUM_FRAMES, size, size), dtype=bool)
    for t in range(NUM_FRAMES):
        for i in np.flatnonzero(audible[t]):
            masks[t] |= owner[t] == i
    return frames.clip(0, 255).round().astype(np.uint8), masks


def render_audio(
    objects: list[SceneObject], num_categories: int, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """``(5 * sample_rate, 2)`` float32 stereo: in second ``t`` the tones of the objects audible then."""
    n = NUM_FRAMES * sample_rate
    t = np.arange(n) / sample_rate
    second = np.repeat(np.arange(NUM_FRAMES), sample_rate)
    mono = np.zeros(n, dtype=np.float64)
    for obj in objects:
        freq = tone_frequency(obj.kind, num_categories, sample_rate)
        phase = rng.uniform(0, 2 * np.pi)
        mono += obj.audible[second] * TONE_AMPLITUDE * np.sin(2 * np.pi * freq * t + phase)
    left = mono + rng.standard_normal(n) * AUDIO_NOISE
    right = 0.8 * mono + rng.standard_normal(n) * AUDIO_NOISE
    return np.stack([left, right], axis=1).clip(-1, 1).astype(np.float32)


def _video_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        vid = "".join(rng.choice(_ID_ALPHABET, 11)) + f"_{int(rng.integers(0, 300)):d}"
        if len(ids) % 5 == 1:
            vid = "-" + vid[1:]  # YouTube IDs may start with '-'
        if vid not in ids:
            ids.append(vid)
    return ids


def _ms3_audible(rng: np.random.Generator) -> np.ndarray:
    on = rng.random(NUM_FRAMES) < 0.75
    while on.sum() < 2:
        on[rng.integers(NUM_FRAMES)] = True
    return on


def s4_scene(kind: int, num_categories: int, size: int, distractor_prob: float,
             rng: np.random.Generator) -> list[SceneObject]:
    """One always-audible object of ``kind`` and maybe a silent distractor of another kind (painted first)."""
    objects: list[SceneObject] = []
    if rng.random() < distractor_prob:
        other = int((kind + rng.integers(1, num_categories)) % num_categories)
        objects.append(_random_object(other, np.zeros(NUM_FRAMES, bool), size, rng))
    objects.append(_random_object(kind, np.ones(NUM_FRAMES, bool), size, rng, tuple(objects)))
    return objects


def ms3_scene(num_categories: int, size: int, rng: np.random.Generator,
              silent_first: bool = False) -> list[SceneObject]:
    """Two objects of different kinds with random audible seconds (both silent in second 1 if asked)."""
    objects: list[SceneObject] = []
    for k in rng.choice(num_categories, 2, replace=False):
        objects.append(_random_object(int(k), _ms3_audible(rng), size, rng, tuple(objects)))
    if silent_first:
        for obj in objects:
            obj.audible[0] = False
            while obj.audible.sum() < 2:
                obj.audible[rng.integers(1, NUM_FRAMES)] = True
    return objects


def _save_png(path: Path, array: np.ndarray, mode: Optional[str] = None) -> None:
    from PIL import Image  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    img = img.convert(mode) if mode else img
    img.save(path, compress_level=1)  # noisy synthetic frames: fast compression, size is irrelevant


def _save_palette_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = mask.shape
    img = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    img.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    img.save(path, compress_level=1)


def _split_order(num_train: int, num_val: int, num_test: int, rng: np.random.Generator) -> list[str]:
    """Split of each CSV row, interleaved (the loader must filter by the ``split`` column, not by position)."""
    if num_train < 1 or num_val < 0 or num_test < 1:
        raise ValueError("need num_train >= 1, num_val >= 0 and num_test >= 1")
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    return [splits[i] for i in rng.permutation(len(splits))]


def write_avsbench_release(
    root: str | os.PathLike[str],
    setting: str = "s4",
    num_train: int = 32,
    num_val: int = 8,
    num_test: int = 8,
    num_categories: int = 4,
    seed: int = 0,
    size: int = 224,
    sample_rate: int = 16000,
    distractor_prob: float = 0.5,
) -> Path:
    """Write a synthetic S4 or MS3 release under ``root`` (overwriting files of the same names).

    Args:
        root: output folder; receives ``<setting>_meta_data.csv`` and ``<setting>_data/``.
        setting: ``s4`` or ``ms3``.
        num_train: clips in the train split.
        num_val: clips in the val split.
        num_test: clips in the test split.
        num_categories: object kinds (S4: the first ``num_categories`` official categories).
        seed: RNG seed (the output is deterministic).
        size: frame and mask side (224 official).
        sample_rate: wav rate (16 kHz official).
        distractor_prob: S4: probability of a silent distractor object.

    Returns:
        ``root`` as a Path.
    """
    if setting not in ("s4", "ms3"):
        raise ValueError(f"setting must be 's4' or 'ms3', got {setting!r}")
    if not 2 <= num_categories <= len(S4_CATEGORIES):
        raise ValueError(f"num_categories must be in [2, {len(S4_CATEGORIES)}], got {num_categories}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    data = root / data_dir_name(setting)
    splits = _split_order(num_train, num_val, num_test, rng)
    ids = _video_ids(len(splits), rng)
    kinds = rng.permutation(np.arange(len(splits)) % num_categories)
    first_test = splits.index("test")
    rows = []
    for i, (split, vid) in enumerate(zip(splits, ids)):
        if setting == "s4":
            category = S4_CATEGORIES[int(kinds[i])]
            objects = s4_scene(int(kinds[i]), num_categories, size, distractor_prob, rng)
            _write_s4_clip(data, split, category, vid, objects, num_categories, size, sample_rate, rng)
            rows.append(f"{vid},{int(rng.integers(0, 6))},{category},{split}\n")
        else:
            objects = ms3_scene(num_categories, size, rng, silent_first=i == first_test)
            _write_ms3_clip(data, split, vid, objects, num_categories, size, sample_rate, rng)
            rows.append(f"{vid},{split}\n")
    header = "name,start_time,category,split\n" if setting == "s4" else "video_id,split\n"
    (root / meta_csv_name(setting)).write_text(header + "".join(rows))
    return root


def _write_s4_clip(data: Path, split: str, category: str, vid: str, objects: list[SceneObject],
                   num_categories: int, size: int, sample_rate: int, rng: np.random.Generator) -> None:
    frames, masks = render_scene(objects, num_categories, size, rng)
    annotated = 1 if split == "train" else NUM_FRAMES
    for t in range(NUM_FRAMES):
        _save_png(data / "visual_frames" / split / category / vid / f"{vid}_{t + 1}.png", frames[t])
        if t < annotated:
            grey = masks[t].astype(np.uint8) * 255
            _save_png(data / "gt_masks" / split / category / vid / f"{vid}_{t + 1}.png", grey, mode="L")
    wav = data / "audio_wav" / split / category / f"{vid}.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    write_wav(wav, render_audio(objects, num_categories, sample_rate, rng), sample_rate)


def _write_ms3_clip(data: Path, split: str, vid: str, objects: list[SceneObject], num_categories: int,
                    size: int, sample_rate: int, rng: np.random.Generator) -> None:
    frames, masks = render_scene(objects, num_categories, size, rng)
    for t in range(NUM_FRAMES):
        _save_png(data / "visual_frames" / vid / f"{vid}.mp4_{t + 1}.png", frames[t])
        _save_palette_mask(data / "gt_masks" / split / vid / f"{vid}_{t + 1}.png", masks[t])
    wav = data / "audio_wav" / split / f"{vid}.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    write_wav(wav, render_audio(objects, num_categories, sample_rate, rng), sample_rate)


# ---- command line (registered in ``python -m avmoe.datamodules.synthetic``) ---------------------------------------
AVS_COMMANDS = {"avs_s4": "s4", "avs_ms3": "ms3"}


def add_avs_parsers(sub: Any) -> None:
    """Add the ``avs_s4`` and ``avs_ms3`` subcommands to an argparse sub-parser collection."""
    for command, setting in AVS_COMMANDS.items():
        p = sub.add_parser(command, help=f"AVSBench {setting.upper()} layout: {meta_csv_name(setting)}, "
                                         f"{data_dir_name(setting)}/{{visual_frames,audio_wav,gt_masks}}")
        p.add_argument("--root", required=True, help="output folder")
        p.add_argument("--num-train", type=int, default=32)
        p.add_argument("--num-val", type=int, default=8)
        p.add_argument("--num-test", type=int, default=8)
        p.add_argument("--num-categories", type=int, default=4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=int, default=224, help="frame and mask side in pixels")
        p.add_argument("--sample-rate", type=int, default=16000)
        p.add_argument("--force", action="store_true", help="write even if the release already exists")


def run_avs(args: argparse.Namespace) -> int:
    """Write the release named by ``args.dataset`` unless its CSV already exists."""
    setting = AVS_COMMANDS[args.dataset]
    root = Path(args.root)
    csv = root / meta_csv_name(setting)
    if csv.is_file() and not args.force:
        print(f"{root}: AVSBench {setting.upper()} release already present ({csv.name} exists); use --force")
        return 0
    tic = time.perf_counter()
    write_avsbench_release(root, setting, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                           num_categories=args.num_categories, seed=args.seed, size=args.size,
                           sample_rate=args.sample_rate)
    total = args.num_train + args.num_val + args.num_test
    print(f"{root}: wrote a synthetic AVSBench {setting.upper()} release ({total} clips) "
          f"in {time.perf_counter() - tic:.1f} s")
    return 0
