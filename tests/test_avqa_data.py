"""MUSIC-AVQA data: JSON traps, vocabularies and tokenisation, the sampling rule, the cache, negatives, the
synthetic release and its command line."""

from __future__ import annotations

import colorsys
import json
import multiprocessing
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from avmoe.datamodules.audio import LogMel, LogMelConfig
from avmoe.datamodules.avqa_cache import ClipCache, ClipStore
from avmoe.datamodules.decoding import DecodeError
from avmoe.datamodules.musicavqa import (
    PAD,
    AVQAClipDecoder,
    AVQAVocab,
    MusicAVQADataModule,
    apply_duplicate_policy,
    read_avqa_json,
    segment_starts,
)
from avmoe.datamodules.synthetic.__main__ import main as synthetic_main
from avmoe.datamodules.synthetic.media import write_mp4
from avmoe.metrics.avqa import QUESTION_TYPES

MEL = LogMelConfig(n_mels=32)

# Raw text as in the release: 'anser', stringified lists, a full-width question mark, a glued placeholder.
RAW = r"""[
{"video_id": "00000086", "question_id": 28, "type": "[\"Audio-Visual\", \"Existential\"]",
 "question_content": "Is the <Object> in the video always playing?", "templ_values": "[\"violin\"]",
 "question_deleted": 0, "anser": "no"},
{"video_id": "va00000005", "question_id": 29, "type": "[\"Visual\", \"Location\"]",
 "question_content": "Where is the <Object>？", "templ_values": "[\"acoustic_guitar\"]",
 "question_deleted": 0, "anser": "left"},
{"video_id": "00000086", "question_id": 30, "type": "[\"Audio\", \"Comparative\"]",
 "question_content": "Is the <Object> louder than the <Object>? ", "templ_values": "[\"piano\", \"flute\"]",
 "question_deleted": 0, "anser": "yes"}
]"""


def write_json(path: Path, items: list | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(items if isinstance(items, str) else json.dumps(items), encoding="utf-8")
    return path


def test_read_json_handles_the_schema_traps(tmp_path):
    table = read_avqa_json(write_json(tmp_path / "avqa-test.json", RAW))
    assert table["answer"].tolist() == ["no", "left", "yes"]
    assert table["video_id"].tolist() == ["00000086", "va00000005", "00000086"]  # leading zeros kept
    assert [QUESTION_TYPES[i] for i in table["qtype"]] == [
        ("Audio-Visual", "Existential"), ("Visual", "Location"), ("Audio", "Comparative")]
    assert table["tokens"].tolist() == [
        ["Is", "the", "violin", "in", "the", "video", "always", "playing"],
        ["Where", "is", "the", "acoustic_guitar"],  # glued <Object>？: mark stripped, then substituted
        ["Is", "the", "piano", "louder", "than", "the", "flute"],  # trailing space rstripped first
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"anser": None}, r"row 1 .*missing key\(s\) \['anser'\]"),
        ({"type": "Audio, Counting"}, r"row 1 .*'type' is not a list"),
        ({"type": "[\"Audio\", \"Location\"]"}, r"row 1 .*unknown MUSIC-AVQA question type Audio/Location"),
        ({"templ_values": "[]"}, r"row 1 .*1 placeholder\(s\) but templ_values has 0"),
        ({"video_id": 86}, r"row 1 .*video_id must be a non-empty string"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, change, message):
    items = json.loads(RAW)
    for key, value in change.items():
        if value is None:
            del items[1][key]
        else:
            items[1][key] = value
    path = write_json(tmp_path / "avqa-train.json", items)
    with pytest.raises(ValueError, match=message) as err:
        read_avqa_json(path)
    assert str(path) in str(err.value)


def test_duplicate_question_ids_policies(tmp_path):
    items = json.loads(RAW)
    items.insert(1, dict(items[0], anser="yes"))  # qid 28 twice, conflicting answers (as json/avqa-test.json)
    path = write_json(tmp_path / "avqa-test.json", items)
    table = read_avqa_json(path)
    with pytest.warns(UserWarning, match=r"1 question_id\(s\) occur more than once \(28\)"):
        kept = apply_duplicate_policy(table, "keep", path)
    assert len(kept) == 4
    with pytest.warns(UserWarning, match="dropped 1 row"):
        first = apply_duplicate_policy(table, "first", path)
    assert first["question_id"].tolist() == [28, 29, 30] and first["answer"].tolist()[0] == "no"
    with pytest.raises(ValueError, match="question_id.*more than once"):
        apply_duplicate_policy(table, "error", path)


def test_vocabularies_first_appearance_and_encoding(tmp_path):
    train = read_avqa_json(write_json(tmp_path / "train.json", RAW))
    vocab = AVQAVocab.from_table(train)
    assert vocab.answers == ["no", "left", "yes"]
    assert vocab.words[:6] == [PAD, "Is", "the", "violin", "in", "video"]
    questions, answers = vocab.encode(train, tmp_path / "train.json", max_len=14)
    assert questions.shape == (3, 14) and answers.tolist() == [0, 1, 2]
    assert [vocab.words[i] for i in questions[1]] == ["Where", "is", "the", "acoustic_guitar"] + [PAD] * 10
    items = json.loads(RAW)
    items[0]["templ_values"] = "[\"erhu\"]"
    test_path = write_json(tmp_path / "test.json", items)
    with pytest.raises(ValueError, match=r"test.json, row 0 \(question_id 28\).*\['erhu'\]"):
        vocab.encode(read_avqa_json(test_path), test_path, max_len=14)
    with pytest.raises(ValueError, match=r"row 0 .*8 words, more than max_question_len=5"):
        vocab.encode(train, tmp_path / "train.json", max_len=5)


# ---------------------------------------------------------------------------------------------- synthetic release


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("musicavqa")
    assert synthetic_main(["musicavqa", "--root", str(root), "--num-videos", "10", "--questions-per-video", "4",
                           "--num-instruments", "3", "--size", "32", "--fps", "2", "--duration", "8"]) == 0
    return root


def test_synthetic_release_has_the_official_layout_and_traps(release, capsys):
    keys = ["video_id", "question_id", "type", "question_content", "templ_values", "question_deleted", "anser"]
    files = {f"{d}/{s}": json.loads((release / d / f"avqa-{s}.json").read_text(encoding="utf-8"))
             for d in ("json", "json_update") for s in ("train", "val", "test")}
    for items in files.values():
        assert all(list(item) == keys for item in items)
        assert all(isinstance(item["type"], str) and isinstance(json.loads(item["type"]), list) for item in items)
    qids = [q["question_id"] for q in files["json/test"]]
    assert len(qids) > len(set(qids)), "the original test file repeats question IDs"
    dup = next(q for q in set(qids) if qids.count(q) > 1)
    assert len({x["anser"] for x in files["json/test"] if x["question_id"] == dup}) == 2, "conflicting answers"
    update_ids = [q["question_id"] for q in files["json_update/test"]]
    assert len(update_ids) == len(set(update_ids)) and set(update_ids) == set(qids)
    everything = [q for items in files.values() for q in items]
    assert any(q["question_content"].endswith("\uff1f") for q in everything)
    assert any(q["question_content"].endswith("<Object>?") or q["question_content"].endswith("<Object>\uff1f")
               for q in everything)
    videos = {s: {q["video_id"] for q in files[f"json_update/{s}"]} for s in ("train", "val", "test")}
    assert videos["train"] & videos["test"], "splits are by question: videos are shared"
    assert all((release / "video" / f"{v}.mp4").is_file() for v in set().union(*videos.values()))
    assert any(not v.isdigit() for v in videos["train"] | videos["test"]), "synthetic-style IDs (va..., sa...)"
    # Rerunning does not rewrite an existing release.
    before = (release / "json" / "avqa-train.json").stat().st_mtime_ns
    assert synthetic_main(["musicavqa", "--root", str(release)]) == 0
    assert "already present" in capsys.readouterr().out
    assert (release / "json" / "avqa-train.json").stat().st_mtime_ns == before


def make_dm(release: Path, **kwargs) -> MusicAVQADataModule:
    args = dict(num_segments=4, clip_seconds=8.0, image_size=32, audio=MEL, num_workers=0, batch_size=4,
                video_backend="pyav")
    args.update(kwargs)
    return MusicAVQADataModule(str(release), **args)


class CountingDecoder:
    """Counts full decodes and partial frame decodes (monkeypatched over AVQAClipDecoder)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        self.frame_calls: list[str] = []
        original, original_frames = AVQAClipDecoder.decode, AVQAClipDecoder.decode_frames
        counter = self

        self.inside = False

        def decode(self, video_id):
            counter.calls.append(video_id)
            counter.inside = True
            try:
                return original(self, video_id)
            finally:
                counter.inside = False

        def decode_frames(self, video_id, segments):
            if not counter.inside:  # partial decodes (negatives without a cache)
                counter.frame_calls.append(video_id)
            return original_frames(self, video_id, segments)

        monkeypatch.setattr(AVQAClipDecoder, "decode", decode)
        monkeypatch.setattr(AVQAClipDecoder, "decode_frames", decode_frames)


def test_datamodule_samples_vocab_and_official_vocab_source(release):
    dm = make_dm(release)
    dm.setup("fit")
    train_json = json.loads((release / "json" / "avqa-train.json").read_text(encoding="utf-8"))
    assert dm.answer_vocab == list(dict.fromkeys(q["anser"] for q in train_json))
    assert dm.question_vocab[0] == PAD
    sample = dm.dataset("train")[0]
    assert sample["video"].shape == (4, 3, 32, 32) and sample["video"].dtype == torch.uint8
    assert sample["audio"].shape == (4, MEL.frames_per_segment, 32)
    assert sample["question"].shape == (14,) and sample["negative_video"].shape == (4, 3, 32, 32)
    first = json.loads((release / "json_update" / "avqa-train.json").read_text(encoding="utf-8"))[0]
    assert int(sample["question_id"]) == first["question_id"] and sample["video_id"] == first["video_id"]
    assert dm.answer_vocab[int(sample["answer"])] == first["anser"]
    assert "negative_video" not in dm.dataset("val")[0], "negatives only for training"
    batch = next(iter(dm.train_dataloader()))
    assert batch["question"].shape == (4, 14) and len(batch["video_id"]) == 4
    # The original annotations keep every row of a repeated question ID (official evaluation).
    orig = make_dm(release, annotations="json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig.setup("test")
    assert orig.dataset_size("test") == len(json.loads((release / "json" / "avqa-test.json").read_text()))


def test_cache_decodes_each_video_once(release, tmp_path, monkeypatch):
    counter = CountingDecoder(monkeypatch)
    dm = make_dm(release, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    videos = set()
    for split in ("train", "val", "test"):
        videos |= set(json.loads((release / "json_update" / f"avqa-{split}.json").read_text())[i]["video_id"]
                      for i in range(len(json.loads((release / "json_update" / f"avqa-{split}.json").read_text()))))
    assert sorted(counter.calls) == sorted(videos), "prepare_data decodes every video exactly once"
    dm.setup(None)
    for _ in range(2):  # two epochs, every split, negatives included
        for split in ("train", "val", "test"):
            for sample in dm.dataset(split):
                assert sample["video"].shape[0] == 4
    assert len(counter.calls) == len(videos) and not counter.frame_calls, "no decoding after the cache is built"
    # Another process (a new DataModule on the same folder) reuses the entries.
    dm2 = make_dm(release, cache_dir=str(tmp_path / "cache"))
    dm2.prepare_data()
    dm2.setup("fit")
    dm2.dataset("train")[1]
    assert len(counter.calls) == len(videos)


def test_cache_matches_on_the_fly_and_is_keyed_by_settings(release, tmp_path, monkeypatch):
    cached, plain = make_dm(release, cache_dir=str(tmp_path / "c"), negatives=False), make_dm(release)
    cached.setup("test")
    plain.setup("test")
    a, b = cached.dataset("test")[2], plain.dataset("test")[2]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    store = cached.clip_store()
    assert (store.cache.directory / "settings.json").is_file()
    assert json.loads((store.cache.directory / "settings.json").read_text())["image_size"] == 32
    assert make_dm(release, cache_dir=str(tmp_path / "c")).clip_store().cache.directory == store.cache.directory
    for change in ({"image_size": 16}, {"num_segments": 2}, {"audio": LogMelConfig(n_mels=16)},
                   {"clip_seconds": 6.0}, {"video_backend": "auto"}):
        other = make_dm(release, cache_dir=str(tmp_path / "c"), **change).clip_store().cache.directory
        assert other != store.cache.directory, change
    # A corrupt entry is reported, decoded again and overwritten.
    vid = a["video_id"]
    frames_path, _ = store.cache.paths(vid)
    frames_path.write_bytes(b"not an npy file")
    counter = CountingDecoder(monkeypatch)
    with pytest.warns(UserWarning, match="unreadable"):
        again = cached.clip_store().clip(vid)
    assert counter.calls == [vid] and np.array_equal(again[0], a["video"].numpy())
    assert np.array_equal(np.load(frames_path), a["video"].numpy())


def _writer(directory: str, settings: dict, seed: int, rounds: int) -> None:
    cache = ClipCache(directory, settings, ((4, 3, 64, 64), (4, 101, 32)))
    frames = np.full((4, 3, 64, 64), 7, dtype=np.uint8)
    audio = np.full((4, 101, 32), 0.5, dtype=np.float32)
    for _ in range(rounds):
        cache.store("00000001", frames, audio)


def test_cache_writes_are_atomic_under_concurrent_writers(tmp_path):
    settings = {"test": "concurrency"}
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), settings, i, 40)) for i in range(3)]
    for w in writers:
        w.start()
    reader = ClipCache(str(tmp_path), settings, ((4, 3, 64, 64), (4, 101, 32)))
    seen = 0
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unreadable / mis-shaped entry would warn
            entry = reader.load("00000001")
        if entry is not None:
            seen += 1
            assert entry[0].min() == entry[0].max() == 7 and float(entry[1][0, 0, 0]) == 0.5
    for w in writers:
        w.join(timeout=60)
        if w.is_alive():  # never leave a hung writer behind
            w.kill()
            w.join()
        assert w.exitcode == 0
    assert seen > 0
    assert sorted(p.name for p in reader.directory.iterdir()) == [
        "00000001.audio.npy", "00000001.frames.npy", "settings.json"], "no temporary files left behind"


def test_negative_frames_come_from_other_videos(release, tmp_path):
    dm = make_dm(release, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.dataset("train")
    store = dm.clip_store()
    frames = {v: np.asarray(store.clip(str(v))[0]) for v in ds.unique_videos}
    torch.manual_seed(0)
    sources = set()
    for i in range(6):
        sample = ds[i]
        for frame in sample["negative_video"].numpy():
            owners = [v for v, f in frames.items() if any(np.array_equal(frame, g) for g in f)]
            assert owners and sample["video_id"] not in owners
            sources.add(owners[0])
    assert len(sources) > 2, "negatives are drawn from many videos"
    # Without a cache only the needed frames of the other videos are decoded (and still not the own video).
    plain = make_dm(release, negative_videos=1)
    plain.setup("fit")
    neg = plain.dataset("train")[0]["negative_video"].numpy()
    assert not any(np.array_equal(f, g) for f in neg for g in frames[str(plain.dataset("train").video_ids[0])])


def test_missing_video_names_the_file_and_skip_policy(release, tmp_path):
    items = json.loads((release / "json_update" / "avqa-test.json").read_text())
    root = tmp_path / "rel"
    for split in ("train", "val", "test"):
        for folder in ("json", "json_update"):
            src = json.loads((release / folder / f"avqa-{split}.json").read_text())
            write_json(root / folder / f"avqa-{split}.json", src)
    dm = make_dm(root, video_root=str(release / "video"))
    dm.setup("test")
    assert dm.dataset("test")[0]["video_id"] == items[0]["video_id"]
    broken = make_dm(root, video_root=str(tmp_path / "nowhere"))
    broken.setup("test")
    with pytest.raises(DecodeError, match=rf"nowhere/{items[0]['video_id']}.mp4.*missing"):
        broken.dataset("test")[0]
    skipping = make_dm(root, video_root=str(tmp_path / "nowhere"), on_decode_error="skip")
    skipping.setup("test")
    assert type(skipping.dataset("test")[0]).__name__ == "SkippedSample"


# ------------------------------------------------------------------------------------------------ sampling rule


def test_sampling_rule_aligns_frames_and_audio(tmp_path):
    """20-s clip whose colour changes every half second and tone every second; 5 segments start at 0, 4, ..., 16 s:
    segment k must show the colour of half-second 8k + 1 (frame at the window centre 4k + 0.5 s, not its start)
    and sound the tone of second 4k (window [4k, 4k + 1))."""
    fps, sr, seconds, size = 4, 16000, 20, 32
    colours = [np.array(colorsys.hsv_to_rgb(h / (2 * seconds), 0.9, 0.9)) * 255 for h in range(2 * seconds)]
    freqs = [300.0 * 1.17**s for s in range(seconds)]
    frames = np.stack([np.broadcast_to(colours[i * 2 // fps], (size, size, 3)) for i in range(seconds * fps)])
    t = np.arange(seconds * sr) / sr
    audio = 0.3 * np.sin(2 * np.pi * np.asarray(freqs)[(t // 1).astype(int)] * t)
    write_mp4(tmp_path / "clip.mp4", frames.round().astype(np.uint8), fps, audio.astype(np.float32), sr)
    cfg = LogMelConfig(sample_rate=sr, n_fft=512, hop_length=160, n_mels=64, fmin=50, fmax=8000)
    starts = segment_starts(5, seconds)
    assert starts.tolist() == [0, 4, 8, 12, 16]
    decoder = AVQAClipDecoder(str(tmp_path), starts, size, cfg, "pyav")
    assert decoder.frame_times.tolist() == [0.5, 4.5, 8.5, 12.5, 16.5]
    got_frames, mel = decoder.decode("clip")
    logmel = LogMel(cfg)
    for k, start in enumerate(starts.astype(int)):
        colour = got_frames[k].reshape(3, -1).mean(1)
        dist = [np.abs(colour - c).sum() for c in colours]
        assert int(np.argmin(dist)) == 2 * start + 1, f"segment {k}: frame from half-second {int(np.argmin(dist))}"
        clean = logmel(0.3 * np.sin(2 * np.pi * freqs[start] * np.arange(sr) / sr), 1)[0]
        inner = slice(5, -5)  # away from the window edges (the neighbouring second's tone leaks into the STFT pad)
        assert mel[k][inner].mean(0).argmax() == clean[inner].mean(0).argmax()
        neighbour = logmel(0.3 * np.sin(2 * np.pi * freqs[start + 1] * np.arange(sr) / sr), 1)[0]
        assert neighbour[inner].mean(0).argmax() != clean[inner].mean(0).argmax()


def test_overlapping_windows_are_refused(tmp_path):
    AVQAClipDecoder(str(tmp_path), segment_starts(10, 8.0), 32, LogMelConfig(segment_seconds=0.8), "pyav")  # fits
    with pytest.raises(ValueError, match="windows would overlap"):
        AVQAClipDecoder(str(tmp_path), segment_starts(10, 8.0), 32, LogMelConfig(segment_seconds=1.0), "pyav")


def test_short_video_is_an_error_not_zero_filled(release):
    dm = make_dm(release, clip_seconds=40.0)  # the synthetic clips last 8 s
    dm.setup("test")
    with pytest.raises(DecodeError, match=r"\.mp4"):
        dm.dataset("test")[0]


def test_clip_store_without_cache_decodes_only_requested_frames(release):
    dm = make_dm(release)
    store = ClipStore(dm.clip_store().decoder, None)
    vid = json.loads((release / "json_update" / "avqa-test.json").read_text())[0]["video_id"]
    full, _ = store.clip(vid)
    assert np.array_equal(store.frames(vid, [3, 0, 3]), full[[3, 0, 3]])
