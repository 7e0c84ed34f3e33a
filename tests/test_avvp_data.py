"""LLP data: parsing the official TAB-separated CSVs, the official dense ground truth, the release quirks
(counted and warned, never crashed on), malformed rows, and the synthetic release through the real decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avmoe.datamodules import LLPDataModule
from avmoe.datamodules.decoding import DecodeError
from avmoe.datamodules.llp import LLP_CATEGORIES, dense_labels, label_targets, read_eval_annotations, read_weak_labels
from avmoe.datamodules.synthetic.__main__ import main as synthetic_main
from avmoe.datamodules.synthetic.ave import class_colour
from avmoe.datamodules.synthetic.llp import make_clips, write_llp_release

SEED, SIZES, K = 3, (6, 3, 4), 3
# Every DataModule warns about the release quirks once; only the quirk test checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:LLP release quirks")


@pytest.fixture(scope="module")
def llp_release(tmp_path_factory) -> Path:
    """A tiny synthetic LLP release (real H.264/AAC mp4 files) with one instance of each official quirk."""
    root = tmp_path_factory.mktemp("llp_release")
    return write_llp_release(root, *SIZES, num_categories=K, seed=SEED)


def _clips() -> dict:
    """The synthetic content of ``llp_release`` (the writer draws the clips first from its seeded RNG)."""
    return make_clips(*SIZES, K, np.random.default_rng(SEED), with_quirks=True)


def _dm(root: Path, **kwargs) -> LLPDataModule:
    return LLPDataModule(str(root), num_workers=0, batch_size=2, image_size=32, **kwargs)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- parsing


def test_weak_labels_parse_ids_and_classes(tmp_path):
    path = _write(tmp_path / "w.csv", "filename\tevent_labels\n-3M-k4nIYIM_30_40\tSpeech,Dog\n"
                                      "AP0061o0Nvk_101.8_111.8\tClapping\n\n")
    table = read_weak_labels(path)
    assert table["video_id"].tolist() == ["-3M-k4nIYIM", "AP0061o0Nvk"]
    assert table["line"].tolist() == [2, 3]
    targets = label_targets(table["label_mask"].to_numpy())
    assert targets.shape == (2, 25)
    assert np.flatnonzero(targets[0]).tolist() == [0, 3]  # Speech, Dog in the official index order
    assert np.flatnonzero(targets[1]).tolist() == [LLP_CATEGORIES.index("Clapping")] == [24]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filename,event_labels\nabcdefghijk_0_10,Dog\n", r"line 1: expected the TAB-separated header"),
        ("filename\tevent_labels\nabcdefghijk_0_10\tDog\nabcdefghijk_1_11\tDog\tCat\n", r"line 3: expected 2"),
        ("filename\tevent_labels\nabcdefghijk_0_10\tDog,Unicorn\n", r"line 2: unknown event label 'Unicorn'"),
        ("filename\tevent_labels\nabcdefghijk_0_10\tDog,\n", r"line 2: empty event label"),
        ("filename\tevent_labels\nabc_0_10\tDog\n", r"line 2: filename 'abc_0_10' is shorter"),
    ],
)
def test_malformed_weak_rows_name_file_and_line(tmp_path, text, message):
    path = _write(tmp_path / "AVVP_bad.csv", text)
    with pytest.raises(ValueError, match=message) as err:
        read_weak_labels(path)
    assert "AVVP_bad.csv" in str(err.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("abcdefghijk_0_10\tx\t4\tDog", "onset/offset must be integer"),
        ("abcdefghijk_0_10\t2\t11\tDog", r"must lie in \[0, 10\]"),
        ("abcdefghijk_0_10\t2\t4\tDog,Cat", "exactly one event label"),
        ("abcdefghijk_0_10\t2\t4\tdog", "unknown event label 'dog'"),
        ("abcdefghijk_0_10\t2\t4", "expected 4"),
    ],
)
def test_malformed_eval_rows_name_file_and_line(tmp_path, row, message):
    header = "filename\tonset\toffset\tevent_labels\n"
    path = _write(tmp_path / "AVVP_eval_bad.csv", f"{header}zzzzzzzzzzz_0_10\t0\t1\tCat\n{row}\n")
    with pytest.raises(ValueError, match=message) as err:
        read_eval_annotations(path)
    assert "AVVP_eval_bad.csv, line 3" in str(err.value)


def test_dense_labels_follow_the_official_rule(tmp_path):
    path = _write(tmp_path / "e.csv", "filename\tonset\toffset\tevent_labels\n"
                                      "aaaaaaaaaaa_0_10\t1\t3\tDog\n"
                                      "aaaaaaaaaaa_0_10\t6\t8\tDog\n"  # same class, second run: union
                                      "aaaaaaaaaaa_0_10\t9\t9\tCat\n"  # offset <= onset: marks nothing
                                      "aaaaaaaaa_0_10\t0\t10\tCar\n"  # mangled name: exact match only
                                      "bbbbbbbbbbb_5_15\t0\t10\tSpeech\n")
    gt = dense_labels(["aaaaaaaaaaa_0_10", "bbbbbbbbbbb_5_15", "ccccccccccc_0_10"], read_eval_annotations(path))
    assert gt.shape == (3, 25, 10) and gt.dtype == np.uint8
    assert gt[0, 3].tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert gt[0].sum() == 4 and gt[1, 0].sum() == 10 and gt[2].sum() == 0


# ------------------------------------------------------------------------------------------- the release


def test_quirks_are_counted_and_warned_not_dropped(llp_release):
    dm = _dm(llp_release)
    with pytest.warns(UserWarning, match="LLP release quirks") as record:
        dm.setup("fit")
    text = str(record[0].message)
    assert "AVVP_eval_audio.csv, line" in text  # examples point at file and line
    q = dm.quirks
    assert q["audio_orphan_rows"] == 1 and q["audio_empty_rows"] == 1
    hidden = _clips()["test"][0]
    hidden_rows = sum(int((np.diff(np.r_[0, hidden.audio[c].astype(int)]) == 1).sum()) for c in hidden.hidden)
    assert q["audio_labels_not_in_weak"] == hidden_rows >= 1  # one row per run of the left-out class
    assert q["test_videos_without_visual_rows"] >= 1
    assert q["visual_orphan_rows"] == 0
    assert dm.dataset_size("train") == SIZES[0] and dm.dataset_size("val") == SIZES[1]


def test_ground_truth_equals_the_rendered_content(llp_release):
    dm = _dm(llp_release)
    dm.setup("test")
    test_set = dm.dataset("test")
    clips = _clips()["test"]
    hidden = clips[0].hidden  # the quirk: an event present in the clip but absent from the weak labels
    assert hidden and all(test_set.labels[0, c] == 0 for c in hidden)
    for i, clip in enumerate(clips):
        for modality, gt in (("audio", test_set.gt_audio[i]), ("visual", test_set.gt_visual[i])):
            expected = np.zeros((25, 10), dtype=np.uint8)
            for cls, mask in getattr(clip, modality).items():
                expected[cls] = mask
            np.testing.assert_array_equal(gt, expected, err_msg=f"{clip.filename} {modality}")
        assert test_set.labels[i].sum() == len(clip.weak_labels)


def test_samples_decode_real_media_with_the_contract_shapes(llp_release):
    dm = _dm(llp_release, audio_source="video")
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["video"].shape == (2, 10, 3, 32, 32) and batch["video"].dtype == torch.uint8
    assert batch["audio"].shape == (2, 10, 101, 64)
    assert batch["labels"].shape == (2, 25) and batch["gt_audio"].shape == (2, 25, 10)
    assert batch["gt_visual"].dtype == torch.float32 and batch["index"].tolist() == [0, 1]
    clips = _clips()["val"][:2]
    assert batch["filename"][0] == clips[0].filename and batch["video_id"][0] == clips[0].filename[:11]
    # The picture really shows each class's colour where it is seen (first class left half, second right half).
    checked = 0
    for i, clip in enumerate(clips):
        for slot, cls in enumerate(clip.classes[:2]):
            if cls in clip.visual:
                seg = int(np.flatnonzero(clip.visual[cls])[0])
                cols = slice(2, 14) if slot == 0 else slice(18, 30)
                region = batch["video"][i, seg, :, :, cols].float().mean(dim=(1, 2)).numpy()
                np.testing.assert_allclose(region, class_colour(cls, K), atol=12)
                checked += 1
    assert checked


def test_train_split_has_weak_labels_only(llp_release):
    dm = _dm(llp_release)
    sample = dm.dataset("train")[0]
    assert "gt_audio" not in sample and sample["labels"].sum() >= 1


def test_missing_video_is_a_decode_error_or_skipped(llp_release, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for f in llp_release.glob("*.csv"):
        (root / f.name).write_text(f.read_text())
    (root / "LLP_dataset" / "video").mkdir(parents=True)  # no videos at all
    with pytest.raises(DecodeError, match="video of .* is missing"):
        _dm(root).dataset("train")[0]
    skipped = _dm(root, on_decode_error="skip").dataset("train")[0]
    assert "missing" in skipped.reason


def test_missing_layout_names_the_missing_files(tmp_path):
    (tmp_path / "AVVP_train.csv").write_text("filename\tevent_labels\n")
    with pytest.raises(FileNotFoundError, match="AVVP_val_pd.csv, AVVP_test_pd.csv"):
        _dm(tmp_path).setup("fit")


def test_synthetic_command_writes_the_release_once(tmp_path, capsys):
    root = tmp_path / "cli"
    args = ["llp", "--root", str(root), "--num-train", "4", "--num-val", "1", "--num-test", "1", "--size", "16",
            "--no-quirks", "--with-wav"]
    assert synthetic_main(args) == 0
    assert (root / "AVVP_eval_visual.csv").is_file() and len(list((root / "LLP_dataset/video").glob("*.mp4"))) == 6
    assert synthetic_main(args) == 0
    assert "already present" in capsys.readouterr().out
    rows = read_eval_annotations(root / "AVVP_eval_audio.csv")
    assert (rows["offset"] > rows["onset"]).all()  # --no-quirks: no empty rows
    # LLP_dataset/audio/<ID>.wav (the official extract_audio.py layout) is used by audio_source wav / auto.
    wav_set, mp4_set = _dm(root, audio_source="wav").dataset("train"), _dm(root, audio_source="video").dataset("train")
    assert wav_set.audio_path(0).suffix == ".wav" and _dm(root).dataset("train").audio_path(0).suffix == ".wav"
    from_wav, from_mp4 = wav_set[0]["audio"], mp4_set[0]["audio"]
    assert from_wav.shape == from_mp4.shape == (10, 101, 64)
    assert (from_wav - from_mp4).abs().median() < 3.0  # same signal (dB), AAC-coded in the mp4


def test_optional_r2plus1d_features_are_loaded_and_checked(llp_release, tmp_path):
    train = _dm(llp_release, st_feature_dir=str(tmp_path)).dataset("train")
    np.save(tmp_path / f"{train.video_ids[0]}.npy", np.arange(10 * 512, dtype=np.float32).reshape(10, 512))
    np.save(tmp_path / f"{train.video_ids[1]}.npy", np.zeros((8, 512), dtype=np.float32))
    assert train[0]["visual_st"].shape == (10, 512) and train[0]["visual_st"][1, 0] == 512
    with pytest.raises(DecodeError, match=r"expected \(10, D\) features, got shape \(8, 512\)"):
        train[1]
    with pytest.raises(DecodeError, match="feature file is missing"):
        train[2]
