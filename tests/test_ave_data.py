"""AVEDataModule on a generated release in the official layout: parsing, labels, batches, policies, plans."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from avmoe.datamodules import (
    AVE_CATEGORIES,
    BACKGROUND,
    NUM_CLASSES,
    AVEDataModule,
    DecodeError,
    LogMelConfig,
    SkippedSample,
    collate,
    read_ave_list,
)
from avmoe.datamodules.synthetic import write_ave_release
from avmoe.datamodules.synthetic.__main__ import main as synthetic_main
from avmoe.datamodules.synthetic.ave import class_colour

SIZES = {"train": 8, "val": 3, "test": 5}
NUM_CATEGORIES = 3
# Small front end for speed: 16 kHz (the clips' native rate), 64 mel bins up to 7 kHz.
AUDIO = LogMelConfig(sample_rate=16000, fmax=7000.0)
TEXT_FILES = ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ave")
    return write_ave_release(
        root, num_train=SIZES["train"], num_val=SIZES["val"], num_test=SIZES["test"],
        num_categories=NUM_CATEGORIES, seed=3, size=32, fps=4,
    )


def _copy_release(src: Path, dst: Path, link_videos: bool = True) -> Path:
    """Copy the text files; the AVE folder is a fresh folder of symlinks (cheap, editable)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        shutil.copy(src / name, dst / name)
    (dst / "AVE").mkdir()
    if link_videos:
        for clip in (src / "AVE").iterdir():
            (dst / "AVE" / clip.name).symlink_to(clip)
    return dst


def _dm(root: Path, **kwargs: object) -> AVEDataModule:
    kwargs = {"num_workers": 0, "image_size": 32, "audio": AUDIO, "batch_size": 3, **kwargs}
    return AVEDataModule(str(root), **kwargs)  # type: ignore[arg-type]


def _rows(path: Path) -> list[list[str]]:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    return [line.split("&") for line in lines if not line.startswith("Category&")]


# ------------------------------------------------------------------------------------ parsing


def test_constants() -> None:
    assert len(AVE_CATEGORIES) == 28 and BACKGROUND == 28 and NUM_CLASSES == 29
    assert AVE_CATEGORIES[1] == "Male speech, man speaking" and AVE_CATEGORIES[27] == "Mandolin"


def test_split_sizes_and_segment_labels(release: Path) -> None:
    dm = _dm(release)
    dm.setup()
    assert {s: dm.dataset_size(s) for s in SIZES} == SIZES
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        ds = dm.dataset(split)
        for i, (category, video_id, _, start, end) in enumerate(_rows(release / name)):
            expected = [AVE_CATEGORIES.index(category) if int(start) <= t < int(end) else 28 for t in range(10)]
            assert ds.labels[i].tolist() == expected and ds.video_ids[i] == video_id


def test_header_and_headerless_annotations_parse(release: Path, tmp_path: Path) -> None:
    with_header = read_ave_list(release / "Annotations.txt")
    assert (release / "Annotations.txt").read_text().startswith("Category&VideoID&Quality&StartTime&EndTime\n")
    plain = _copy_release(release, tmp_path / "plain", link_videos=False)
    text = (plain / "Annotations.txt").read_text()
    (plain / "Annotations.txt").write_text(text.split("\n", 1)[1])
    without = read_ave_list(plain / "Annotations.txt")
    cols = ["category", "video_id", "start", "end", "class_index"]
    assert len(with_header) == sum(SIZES.values()) and with_header[cols].equals(without[cols])
    # The split tables map onto the same Annotations rows either way.
    a, b = _dm(release), _dm(plain)
    assert np.array_equal(a.dataset("test").table["annotation_row"], b.dataset("test").table["annotation_row"])


def test_repeated_video_id_rows_keep_their_own_labels(release: Path) -> None:
    dm = _dm(release)
    train, test = dm.dataset("train"), dm.dataset("test")
    shared = set(train.video_ids) & set(test.video_ids)
    assert len(shared) == 1
    vid = shared.pop()
    i, j = list(train.video_ids).index(vid), list(test.video_ids).index(vid)
    assert not np.array_equal(train.labels[i], test.labels[j])
    assert train.table["annotation_row"][i] != test.table["annotation_row"][j]
    # Both rows decode the same file (which shows both events); each keeps its own label.
    a, b = train[i], test[j]
    assert torch.equal(a["video"], b["video"]) and a["video_id"] == b["video_id"] == vid
    assert torch.equal(a["label"], torch.from_numpy(train.labels[i]))
    assert torch.equal(b["label"], torch.from_numpy(test.labels[j]))


def test_zero_length_row_is_all_background(release: Path) -> None:
    ds = _dm(release).dataset("train")
    zero = np.flatnonzero((ds.table["start"] == 0) & (ds.table["end"] == 0))
    assert len(zero) == 1 and (ds.labels[zero[0]] == BACKGROUND).all()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("Bark&abcdefghijk&good&1", "expected 5"),
        ("Bark&abcdefghijk&good&1.5&3", "must be integers"),
        ("Bark&abcdefghijk&good&5&3", "StartTime <= EndTime"),
        ("Bark&abcdefghijk&good&0&11", "<= 10"),
        ("Dog&abcdefghijk&good&0&10", "unknown category 'Dog'"),
    ],
)
def test_malformed_row_names_file_and_line(release: Path, tmp_path: Path, row: str, message: str) -> None:
    root = _copy_release(release, tmp_path / "bad", link_videos=False)
    lines = (root / "valSet.txt").read_text().splitlines()
    lines.insert(1, row)
    (root / "valSet.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"valSet.txt, line 2: .*{message}"):
        _dm(root).setup("validate")


def test_missing_root_and_files(release: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere does not exist .*Annotations.txt"):
        _dm(tmp_path / "nowhere").setup("fit")
    root = _copy_release(release, tmp_path / "partial", link_videos=False)
    (root / "testSet.txt").unlink()
    shutil.rmtree(root / "AVE")
    with pytest.raises(FileNotFoundError, match=r"lacks testSet.txt, AVE/ \(expected"):
        _dm(root).setup("fit")


# ------------------------------------------------------------------------------------ samples and batches


def test_batch_contract_and_recoverable_content(release: Path) -> None:
    dm = _dm(release, limit_samples=3)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["video"].shape == (3, 10, 3, 32, 32) and batch["video"].dtype == torch.uint8
    assert batch["audio"].shape == (3, 10, 51, 64) and batch["audio"].dtype == torch.float32
    assert batch["label"].shape == (3, 10) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.int64
    for key in ("audio_mask", "visual_mask"):
        assert batch[key].dtype == torch.float32 and batch[key].tolist() == [1.0, 1.0, 1.0]
    assert isinstance(batch["video_id"], list) and "skipped" not in batch
    # Event segments show the class colour (centre frame); background is mid-gray; events are louder.
    for video, label, mel in zip(batch["video"], batch["label"], batch["audio"]):
        rgb = video.float().mean(dim=(2, 3))
        for t, k in enumerate(label.tolist()):
            target = np.full(3, 128.0) if k == BACKGROUND else class_colour(k, NUM_CATEGORIES).astype(float)
            assert np.abs(rgb[t].numpy() - target).max() < 12, (t, k)
        energy = mel.amax(dim=(1, 2))
        if (label != BACKGROUND).any() and (label == BACKGROUND).any():
            assert energy[label != BACKGROUND].min() > energy[label == BACKGROUND].max() + 10


def test_audio_source_wav_and_video(release: Path, tmp_path: Path) -> None:
    root = _copy_release(release, tmp_path / "wav")
    ds = _dm(root).dataset("val")
    mp4 = ds.video_path(0)
    from avmoe.datamodules import read_audio
    from avmoe.datamodules.synthetic import write_wav

    write_wav(mp4.with_suffix(".wav"), read_audio(mp4, 16000), 16000)
    assert ds.audio_path(0) == mp4.with_suffix(".wav") and ds.audio_path(1) == ds.video_path(1)
    from_wav = ds[0]["audio"]
    video_only = _dm(root, audio_source="video").dataset("val")
    assert video_only.audio_path(0) == mp4
    assert torch.corrcoef(torch.stack([from_wav.flatten(), video_only[0]["audio"].flatten()]))[0, 1] > 0.99
    wav_only = _dm(root, audio_source="wav").dataset("val")
    with pytest.raises(DecodeError, match=r"\.wav: file not found"):
        wav_only[1]


# ------------------------------------------------------------------------------------ decode-error policy


def test_missing_video_raise_and_skip(release: Path, tmp_path: Path) -> None:
    root = _copy_release(release, tmp_path / "hole")
    victim = _dm(root).dataset("test").video_path(2)
    victim.unlink()
    with pytest.raises(DecodeError, match=rf"{victim.name}: video listed in the split file is missing"):
        _dm(root).dataset("test")[2]

    dm = _dm(root, on_decode_error="skip", batch_size=5)
    skipped = dm.dataset("test")[2]
    assert isinstance(skipped, SkippedSample) and skipped.index == 2 and skipped.path == str(victim)
    batch = next(iter(dm.test_dataloader()))
    assert batch["index"].tolist() == [0, 1, 3, 4] and batch["skipped"] == [(str(victim), skipped.reason)]
    with pytest.warns(UserWarning, match=rf"Skipped 1 clip.*{victim.name}"):
        batch = dm.on_after_batch_transfer(batch, 0)
    assert "skipped" not in batch and dm.skipped_clips == {str(victim): skipped.reason}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file again: counted, not warned
        dm.on_after_batch_transfer(collate([skipped]), 0)
    assert dm.num_skipped == 2


# ------------------------------------------------------------------------------------ train plan and workers


def test_set_train_plan_repeats_and_masks(release: Path) -> None:
    dm = _dm(release, batch_size=8)
    dm.setup("fit")
    dm.set_train_plan(np.array([5, 5, 0, 7]), audio_mask=np.array([1, 0, 1, 0]), visual_mask=np.array([0, 1, 1, 1]))
    batch = next(iter(dm.train_dataloader()))
    got = sorted(zip(batch["index"].tolist(), batch["audio_mask"].tolist(), batch["visual_mask"].tolist()))
    assert got == [(0, 1.0, 1.0), (5, 0.0, 1.0), (5, 1.0, 0.0), (7, 0.0, 1.0)]
    labels = dm.dataset("train").labels
    for index, label in zip(batch["index"].tolist(), batch["label"]):
        assert label.tolist() == labels[index].tolist()

    state = dm.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["train_plan"].values())
    resumed = _dm(release)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.train_plan["indices"], [5, 5, 0, 7])
    assert np.array_equal(resumed.train_plan["visual_mask"], [0, 1, 1, 1])

    dm.set_train_plan(None)
    assert len(dm.train_dataloader().dataset) == SIZES["train"] and dm.state_dict() == {"train_plan": None}
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        dm.set_train_plan(np.array([0, 8]))
    with pytest.raises(ValueError, match="audio_mask has shape"):
        dm.set_train_plan(np.array([0, 1]), audio_mask=np.ones(3))


def test_loader_with_two_workers(release: Path) -> None:
    dm = _dm(release, num_workers=2, batch_size=2, limit_samples=6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.worker_init_fn is not None
    seen = [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(seen) == list(range(6))


def test_synthetic_cli_writes_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ave", "--root", str(tmp_path / "r"), "--num-train", "2", "--num-val", "0", "--num-test", "1", "--no-header"]
    assert synthetic_main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "r" / "Annotations.txt").read_text().startswith("Category&")
    assert len(list((tmp_path / "r" / "AVE").glob("*.mp4"))) == 2  # the test row repeats a train VideoID
    assert synthetic_main(args) == 0
    assert "already present" in capsys.readouterr().out


def test_hparams_are_plain_and_round_trip(release: Path) -> None:
    """hparams hold ``audio`` as a dict (checkpoints load with weights_only=True) and rebuild the module."""
    dm = _dm(release, audio_source="video")
    assert dm.hparams["audio"] == {**dm.hparams["audio"], "sample_rate": 16000, "fmax": 7000.0}
    assert dm.hparams["audio_source"] == "video" and dm.hparams["root"] == str(release)
    clone = AVEDataModule(**dm.hparams)
    assert clone.audio == AUDIO and clone.audio_source == "video"
