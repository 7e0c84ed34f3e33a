"""AVSBench S4 / MS3 from the official on-disk layouts: samples, masks, audio, bad input, the synthetic writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image

from avmoe.datamodules import AVSBenchDataModule, DecodeError, SkippedSample, collate
from avmoe.datamodules.avsbench import read_avsbench_csv, read_mask
from avmoe.datamodules.synthetic.__main__ import main as synthetic_main
from avmoe.datamodules.synthetic.avsbench import write_avsbench_release

COUNTS = {"train": 3, "val": 1, "test": 2}


@pytest.fixture(scope="module")
def s4_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avs_s4")
    return write_avsbench_release(root, "s4", num_train=3, num_val=1, num_test=2, seed=1, distractor_prob=1.0)


@pytest.fixture(scope="module")
def ms3_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avs_ms3")
    return write_avsbench_release(root, "ms3", num_train=3, num_val=1, num_test=2, seed=2)


def _dm(root: Path, setting: str, **kwargs) -> AVSBenchDataModule:
    dm = AVSBenchDataModule(str(root), setting=setting, num_workers=0, **kwargs)
    dm.setup(None)
    return dm


def _saturation(frames: torch.Tensor) -> torch.Tensor:  # (T, 3, H, W) uint8 -> (T, H, W)
    f = frames.float()
    return f.max(1).values - f.min(1).values


def test_s4_samples_follow_the_official_layout(s4_root):
    dm = _dm(s4_root, "s4")
    csv = pd.read_csv(s4_root / "s4_meta_data.csv")
    for split, n in COUNTS.items():
        ds = dm.dataset(split)
        assert len(ds) == n
        assert list(ds.video_ids) == csv[csv["split"] == split]["name"].tolist()  # CSV order, filtered by split
    train, test = dm.dataset("train")[0], dm.dataset("test")[1]
    assert train["video"].shape == (5, 3, 224, 224) and train["video"].dtype == torch.uint8
    assert train["audio"].shape == (5, 101, 64) and train["audio"].dtype == torch.float32
    assert train["mask"].shape == (5, 1, 224, 224) and train["mask"].dtype == torch.float32
    assert train["mask_valid"].tolist() == [True, False, False, False, False]  # S4 train: first frame only
    assert train["mask"][1:].sum() == 0 and train["mask"][0].sum() > 0
    assert test["mask_valid"].all() and (test["mask"].sum((1, 2, 3)) > 0).all()
    for sample in (train, test):
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert sample["category"] in csv["category"].tolist()
        # The mask covers the saturated (sounding) shape; the grey background and the silent distractor are out.
        sat, mask = _saturation(sample["video"]), sample["mask"][:, 0] > 0
        valid = sample["mask_valid"]
        assert sat[valid][mask[valid]].mean() > 100
        assert (mask[valid] & (sat[valid] < 40)).float().mean() < 0.01
        assert ((sat[valid] > 100) & ~mask[valid]).any(), "the silent distractor must be visible but unmasked"
    wav = s4_root / "s4_data" / "audio_wav" / "test" / test["category"] / f"{test['video_id']}.wav"
    info = sf.info(str(wav))
    assert (info.channels, info.samplerate) == (2, 16000)  # official wavs: 16 kHz stereo, resampled on load


def test_ms3_samples_follow_the_official_layout(ms3_root):
    frames = sorted((ms3_root / "ms3_data" / "visual_frames").glob("*/*.png"))
    assert frames and all(".mp4_" in p.name for p in frames)  # <video>.mp4_<i>.png, no split folder
    dm = _dm(ms3_root, "ms3")
    train = dm.dataset("train")[0]
    assert train["mask_valid"].all()  # MS3: all five frames annotated in every split
    assert Image.open(dm.dataset("train").mask_path(0, 0)).mode == "P"  # palette indices 0/1 binarised
    assert set(train["mask"].unique().tolist()) == {0.0, 1.0}
    first_test = dm.dataset("test")[0]  # the writer silences both objects in its first second
    assert first_test["mask"][0].sum() == 0 and first_test["mask"][1:].sum() > 0
    peak = first_test["audio"].max(-1).values.mean(-1)  # (5,) mean over frames of the loudest mel bin, dB
    assert peak[0] < peak[1:].max() - 15, "segment 1 (silent second) must be quiet: 1-s segments aligned"
    assert first_test["category"] == ""


def test_batches_collate(s4_root):
    dm = _dm(s4_root, "s4", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 5, 3, 224, 224) and batch["mask_valid"].shape == (2, 5)
    assert batch["mask_valid"].dtype == torch.bool and isinstance(batch["video_id"], list)


@pytest.fixture
def broken_s4(s4_root, tmp_path) -> tuple[Path, AVSBenchDataModule]:
    root = Path(shutil.copytree(s4_root, tmp_path / "s4"))
    return root, _dm(root, "s4")


def test_missing_frame_names_the_file(broken_s4):
    root, dm = broken_s4
    ds = dm.dataset("test")
    frame = ds.frame_path(0, 2)
    frame.unlink()
    with pytest.raises(DecodeError, match="frame missing") as err:
        ds[0]
    assert str(frame) in str(err.value)
    skipping = _dm(root, "s4", on_decode_error="skip").dataset("test")
    assert isinstance(skipping[0], SkippedSample)
    assert collate([skipping[0], skipping[1]])["skipped"][0][0] == str(frame)


def test_mask_of_wrong_size_names_the_file(broken_s4):
    _, dm = broken_s4
    ds = dm.dataset("val")
    mask = ds.mask_path(0, 3)
    Image.new("L", (100, 100)).save(mask)
    with pytest.raises(DecodeError, match="100x100.*expected 224x224") as err:
        ds[0]
    assert str(mask) in str(err.value)


def test_unreadable_or_missing_wav_names_the_file(broken_s4):
    _, dm = broken_s4
    ds = dm.dataset("train")
    wav = ds.audio_path(0)
    wav.write_bytes(b"RIFF-but-not-really-a-wav")
    with pytest.raises(DecodeError, match="soundfile cannot read") as err:
        ds[0]
    assert str(wav) in str(err.value)
    wav.unlink()
    with pytest.raises(DecodeError, match="file not found"):
        ds[0]


def test_bad_csv_and_layout(tmp_path, s4_root):
    bad = tmp_path / "s4_meta_data.csv"
    bad.write_text("name,start_time,category,split\nabc,0,dog_barking,train\nxyz,0,dog_barking,tset\n")
    with pytest.raises(ValueError, match=r"s4_meta_data.csv, line 3: split must be one of"):
        read_avsbench_csv(bad, "s4")
    bad.write_text("name,start_time,split\nabc,0,train\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['category'\]"):
        read_avsbench_csv(bad, "s4")
    assert read_avsbench_csv(bad, "ms3")["video_id"].tolist() == ["abc"]  # MS3 has no category column
    with pytest.raises(FileNotFoundError, match="lacks s4_data/visual_frames/"):
        _dm(tmp_path, "s4")
    with pytest.raises(FileNotFoundError, match="ms3_meta_data.csv"):
        _dm(s4_root, "ms3")
    with pytest.raises(ValueError, match="'s4' or 'ms3'"):
        AVSBenchDataModule(str(s4_root), setting="s5")


@pytest.mark.parametrize(
    "mode, values",
    [("P", [0, 1, 2]), ("L", [0, 255, 128]), ("1", [0, 255, 255]), ("RGB", [(0, 0, 0), (255, 255, 255), (3, 0, 0)])],
)
def test_masks_are_binarised_explicitly(tmp_path, mode, values):
    img = Image.new(mode, (4, 4), values[0])
    img.putpixel((1, 1), values[1])
    img.putpixel((2, 2), values[2])
    path = tmp_path / f"m_{mode}.png"
    img.save(path)
    mask = read_mask(path, 4)
    assert mask.dtype == bool and mask.sum() == 2 and mask[1, 1] and mask[2, 2]
    if mode == "L":
        assert read_mask(path, 4, threshold=128).sum() == 1


def test_synthetic_command_line(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--num-train", "1", "--num-val", "0", "--num-test", "1", "--size", "32"]
    assert synthetic_main(["avs_ms3", *args]) == 0
    assert (tmp_path / "ms3_meta_data.csv").read_text().count("\n") == 3
    assert len(list((tmp_path / "ms3_data" / "gt_masks").glob("*/*/*.png"))) == 10
    assert synthetic_main(["avs_ms3", *args]) == 0
    assert "already present" in capsys.readouterr().out
    assert synthetic_main(["avs_s4", *args]) == 0  # S4 beside MS3: separate CSV and data folder
    masks = list((tmp_path / "s4_data" / "gt_masks").glob("*/*/*/*.png"))
    assert sorted(p.name[-6:] for p in masks) == ["_1.png"] + ["_1.png", "_2.png", "_3.png", "_4.png", "_5.png"]
    assert np.asarray(Image.open(masks[0])).shape == (32, 32)
