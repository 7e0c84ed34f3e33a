"""A small synthetic MUSIC-AVQA release in the official layout (GeWu-Lab/MUSIC-AVQA).

Each video is a scene of one instrument (in the middle) or two (left and right). An instrument is seen as a solid
coloured band (its hue) and heard as a pure tone (its frequency); which instruments sound, when (the whole clip,
or the first half then the second) and how loud is drawn per video, and a sound may come from an instrument that
is not in the picture. The questions use the official templates' style and answers from the official
vocabulary, and their answers depend on the sound (Audio: Counting, Comparative), on the picture (Visual:
Counting, Location) or on both (Audio-Visual: Existential, Counting, Location, Comparative, Temporal).

The clips are short (``duration`` seconds, 10 by default; the release has 60-s clips) but keep the format:
H.264 + AAC ``video/<video_id>.mp4``, real and synthetic-style video IDs (``00000123``, ``va00000005``, ...).

The annotation files reproduce the schema and its traps: the 7 keys of the release with the answer under
``anser``, ``type`` and ``templ_values`` as JSON lists stored as strings, some questions ending in a full-width
``？``, a placeholder glued to the question mark (``Where is the <Object>?``), splits by question (videos shared
across splits), ``json/`` and ``json_update/`` folders, and in ``json/avqa-test.json`` / ``json/avqa-val.json``
repeated question IDs with conflicting answers that ``json_update/`` removes.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .media import write_mp4

INSTRUMENTS: tuple[str, ...] = ("violin", "piano", "flute", "drum", "cello", "guzheng", "trumpet", "accordion")
NUMBERS = ("zero", "one", "two")
FAKE_PREFIXES = ("va", "sa", "eva", "esa", "vv", "evv")
LOUD, SOFT, NOISE = 0.35, 0.1, 0.01
SPLIT_SHARES = {"train": 0.6, "val": 0.15, "test": 0.25}


@dataclass
class Scene:
    """What one video shows and sounds. ``sounds``: (instrument, start_fraction, end_fraction, amplitude)."""

    visible: dict[str, str]  # instrument -> position (left / right / middle)
    sounds: list[tuple[str, float, float, float]]
    mode: str  # single / both / sequence / offscreen
    questions: list[dict[str, Any]] = field(default_factory=list)


def tone_frequency(k: int, num_instruments: int) -> float:
    """Tone of instrument ``k`` in Hz: geometric from 330 Hz to 3.3 kHz."""
    return float(330.0 * 10 ** (k / max(num_instruments - 1, 1)))


def instrument_colour(k: int, num_instruments: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(k / num_instruments, 0.9, 0.95)
    return np.array([r, g, b]) * 255


def draw_scene(rng: np.random.Generator, pool: tuple[str, ...]) -> Scene:
    n_visible = int(rng.integers(1, 3))
    names = [str(x) for x in rng.permutation(pool)]
    shown = names[:n_visible]
    visible = {shown[0]: "middle"} if n_visible == 1 else dict(zip(shown, ("left", "right")))
    modes = ["single", "offscreen"] + (["both", "sequence", "both", "sequence"] if n_visible == 2 else [])
    mode = str(rng.choice(modes))
    if mode == "single":
        sounds = [(shown[int(rng.integers(n_visible))], 0.0, 1.0, LOUD)]
    elif mode == "offscreen":
        sounds = [(names[n_visible], 0.0, 1.0, LOUD)]
    elif mode == "both":
        loud = int(rng.integers(2))
        sounds = [(shown[loud], 0.0, 1.0, LOUD), (shown[1 - loud], 0.0, 1.0, SOFT)]
    else:  # sequence: one instrument in the first half, the other in the second
        first = int(rng.integers(2))
        sounds = [(shown[first], 0.0, 0.5, LOUD), (shown[1 - first], 0.5, 1.0, LOUD)]
    return Scene(visible=visible, sounds=sounds, mode=mode)


def _q(group: str, kind: str, content: str, values: list[str], answer: str) -> dict[str, Any]:
    return {"type": [group, kind], "question_content": content, "templ_values": values, "anser": answer}


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Every question that applies to ``scene`` (answers from the official vocabulary)."""
    sounding = [s[0] for s in scene.sounds]
    heard_visible = [name for name in sounding if name in scene.visible]
    out = [
        _q("Audio", "Counting", "How many instruments are sounding in the video?", [], NUMBERS[len(sounding)]),
        _q("Visual", "Counting", "How many instruments are in the entire video?", [], NUMBERS[len(scene.visible)]),
        _q("Audio-Visual", "Existential", "Is this sound from the instrument in the video?", [],
           "yes" if scene.mode != "offscreen" else "no"),
        _q("Audio-Visual", "Counting", "How many instruments in the video did not sound from beginning to end?", [],
           NUMBERS[len(scene.visible) - len(heard_visible)]),
    ]
    name = str(rng.choice(list(scene.visible)))
    out.append(_q("Visual", "Location", "Where is the <Object>?", [name], scene.visible[name]))
    if scene.mode == "both":
        (loud, *_), (soft, *_) = scene.sounds
        a, b = (loud, soft) if rng.random() < 0.5 else (soft, loud)
        out.append(_q("Audio", "Comparative", "Is the <Object> louder than the <Object>?", [a, b],
                      "yes" if a == loud else "no"))
        sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
        first_is_loud = scene.visible[loud] == sides[0]
        out.append(_q("Audio-Visual", "Comparative", "Is the instrument on the <LR> louder than the instrument on "
                      "the <LR>?", sides, "yes" if first_is_loud else "no"))
    if scene.mode in ("single", "sequence"):
        which = "first" if rng.random() < 0.5 else "last"
        target = scene.sounds[0][0] if which == "first" else scene.sounds[-1][0]
        out.append(_q("Audio-Visual", "Location", "Where is the <FL> sounding instrument?", [which],
                      scene.visible[target]))
    if scene.mode == "sequence":
        (first, *_), (second, *_) = scene.sounds
        if rng.random() < 0.5:
            out.append(_q("Audio-Visual", "Temporal", "Which instrument makes sounds <BA> the <Object>?",
                          ["before", second], first))
        else:
            out.append(_q("Audio-Visual", "Temporal", "Which instrument makes sounds <BA> the <Object>?",
                          ["after", first], second))
    return out


def render(scene: Scene, rng: np.random.Generator, pool: tuple[str, ...], duration: float, size: int, fps: int,
           sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(duration * fps, size, size, 3)`` uint8 and mono audio ``(duration * sr,)`` float32."""
    n_frames = int(round(duration * fps))
    image = np.full((size, size, 3), 40.0)
    bands = {"left": slice(0, size // 2), "right": slice(size // 2, size), "middle": slice(size // 4, 3 * size // 4)}
    for name, pos in scene.visible.items():
        image[size // 6 : size - size // 6, bands[pos]] = instrument_colour(pool.index(name), len(pool))
    frames = image[None] + rng.standard_normal((n_frames, size, size, 3)) * 6.0
    frames = frames.clip(0, 255).round().astype(np.uint8)
    n = int(round(duration * sample_rate))
    t = np.arange(n) / sample_rate
    audio = rng.standard_normal(n) * NOISE
    for name, start, end, amp in scene.sounds:
        on = (t >= start * duration) & (t < end * duration)
        audio += np.where(on, amp * np.sin(2 * np.pi * tone_frequency(pool.index(name), len(pool)) * t), 0.0)
    return frames, audio.astype(np.float32)


def _video_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    numbers = rng.choice(np.arange(1, 9000), size=n, replace=False)
    for i, num in enumerate(numbers):
        prefix = str(FAKE_PREFIXES[i % len(FAKE_PREFIXES)]) if i % 3 == 2 else ""
        ids.append(f"{prefix}{int(num):08d}")
    return ids


def _words(item: dict[str, Any]) -> set[str]:
    words = item["question_content"][:-1].split(" ")
    return {w for w in words if "<" not in w} | set(item["templ_values"])


def assign_splits(items: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
    """Random split per question; a val/test question whose answer or words train lacks moves to train."""
    draws = rng.choice(list(SPLIT_SHARES), size=len(items), p=list(SPLIT_SHARES.values()))
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLIT_SHARES}
    for item, split in zip(items, draws):
        splits[str(split)].append(item)
    answers = {q["anser"] for q in splits["train"]}
    words = set().union(*(_words(q) for q in splits["train"])) if splits["train"] else set()
    for split in ("val", "test"):
        keep = []
        for q in splits[split]:
            if q["anser"] in answers and _words(q) <= words:
                keep.append(q)
            else:
                splits["train"].append(q)
                answers.add(q["anser"])
                words |= _words(q)
        splits[split] = keep
    for split in splits:
        splits[split].sort(key=lambda q: q["question_id"])  # the release files are sorted by question_id
    return splits


def release_record(item: dict[str, Any]) -> dict[str, Any]:
    """One JSON object with the release's 7 keys, in its key order and string-encoded lists."""
    return {
        "video_id": item["video_id"],
        "question_id": item["question_id"],
        "type": json.dumps(item["type"]),
        "question_content": item["question_content"],
        "templ_values": json.dumps(item["templ_values"]),
        "question_deleted": 0,
        "anser": item["anser"],
    }


def _with_duplicates(items: list[dict[str, Any]], count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The original files' bug: some question IDs appear twice, the copy with a different answer."""
    out = list(items)
    alternatives = {"yes": "no", "no": "yes", "one": "two", "two": "one", "zero": "one", "left": "right",
                    "right": "left", "middle": "left"}
    candidates = [i for i, q in enumerate(items) if q["anser"] in alternatives]
    for i in sorted(rng.choice(candidates, size=min(count, len(candidates)), replace=False), reverse=True):
        copy = dict(items[int(i)], anser=alternatives[items[int(i)]["anser"]])
        out.insert(int(i) + 1, copy)
    return out


def _dump(path: Path, items: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([release_record(q) for q in items], ensure_ascii=False, indent=1), encoding="utf-8")


def write_musicavqa_release(
    root: str | os.PathLike[str],
    num_videos: int = 24,
    questions_per_video: int = 5,
    num_instruments: int = 4,
    seed: int = 0,
    duration: float = 10.0,
    size: int = 64,
    fps: int = 4,
    sample_rate: int = 16000,
    num_duplicates: int = 2,
    fullwidth_fraction: float = 0.15,
) -> Path:
    """Write a synthetic MUSIC-AVQA release under ``root`` (overwriting files of the same names).

    Args:
        root: output folder (created): ``json/``, ``json_update/`` and ``video/``.
        num_videos: number of videos (each gets up to ``questions_per_video`` questions).
        questions_per_video: questions drawn per video from those that apply to its scene.
        num_instruments: instruments in the pool (2 to 8).
        seed: RNG seed (the output is deterministic).
        duration: clip length in seconds (the release: 60).
        size: frame side (even).
        fps: video frame rate.
        sample_rate: AAC audio rate.
        num_duplicates: repeated question IDs in ``json/avqa-test.json`` (half as many, at least one, in
            ``json/avqa-val.json``); ``json_update/`` has none.
        fullwidth_fraction: share of questions ending in the full-width ``？``.

    Returns:
        ``root`` as a Path.
    """
    if not 2 <= num_instruments <= len(INSTRUMENTS):
        raise ValueError(f"num_instruments must be in [2, {len(INSTRUMENTS)}], got {num_instruments}")
    if num_videos < 2 or questions_per_video < 1:
        raise ValueError("need num_videos >= 2 and questions_per_video >= 1")
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "video").mkdir(parents=True, exist_ok=True)
    pool = INSTRUMENTS[:num_instruments]
    items: list[dict[str, Any]] = []
    for video_id in _video_ids(num_videos, rng):
        scene = draw_scene(rng, pool)
        frames, audio = render(scene, rng, pool, duration, size, fps, sample_rate)
        write_mp4(root / "video" / f"{video_id}.mp4", frames, fps, audio, sample_rate)
        questions = scene_questions(scene, rng)
        for j in rng.permutation(len(questions))[:questions_per_video]:
            q = dict(questions[int(j)], video_id=video_id, question_id=len(items) + 1)
            if rng.random() < fullwidth_fraction:
                q["question_content"] = q["question_content"][:-1] + "\uff1f"
            items.append(q)
    splits = assign_splits(items, rng)
    for split, rows in splits.items():
        _dump(root / "json_update" / f"avqa-{split}.json", rows)
        dups = {"train": 0, "val": max(1, num_duplicates // 2), "test": num_duplicates}[split]
        _dump(root / "json" / f"avqa-{split}.json", _with_duplicates(rows, dups, rng) if dups else rows)
    return root


def add_musicavqa_parser(sub: Any) -> None:
    """Register ``python -m avmoe.datamodules.synthetic musicavqa``."""
    p = sub.add_parser("musicavqa", help="MUSIC-AVQA layout: json/ and json_update/avqa-*.json, video/<id>.mp4")
    p.add_argument("--root", required=True, help="output folder (the release's data/ folder)")
    p.add_argument("--num-videos", type=int, default=24)
    p.add_argument("--questions-per-video", type=int, default=5)
    p.add_argument("--num-instruments", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=10.0, help="clip length in seconds (the release: 60)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--fps", type=int, default=4)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--num-duplicates", type=int, default=2, help="repeated question IDs in json/avqa-test.json")
    p.add_argument("--force", action="store_true", help="write even if the release already exists")


def run_musicavqa(args: Any) -> int:
    """Write the release unless ``json_update/avqa-train.json`` already exists (``--force`` rewrites)."""
    import time  # noqa: PLC0415

    root = Path(args.root)
    marker = root / "json_update" / "avqa-train.json"
    if marker.is_file() and not args.force:
        print(f"{root}: MUSIC-AVQA release already present ({marker} exists); use --force to rewrite")
        return 0
    tic = time.perf_counter()
    write_musicavqa_release(
        root, num_videos=args.num_videos, questions_per_video=args.questions_per_video,
        num_instruments=args.num_instruments, seed=args.seed, duration=args.duration, size=args.size, fps=args.fps,
        sample_rate=args.sample_rate, num_duplicates=args.num_duplicates,
    )
    print(f"{root}: wrote a synthetic MUSIC-AVQA release ({args.num_videos} videos) in "
          f"{time.perf_counter() - tic:.1f} s")
    return 0
