"""Malformed annotation files: each case a user can hit gets an AnnotationError naming the file and the line (or a
warning, where the release itself has the quirk), never a library exception and never a silent empty split.

The cases are those a seeded fuzzer found (issue 11, item 7); ``test_fuzz_annotations.py`` keeps fuzzing."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avmoe.datamodules import AVEDataModule, AVSBenchDataModule, LLPDataModule, MusicAVQADataModule
from avmoe.datamodules.annotations import AnnotationError
from avmoe.datamodules.audio import LogMelConfig
from avmoe.datamodules.decoding import DecodeError
from avmoe.datamodules.llp import EVAL_HEADER, WEAK_HEADER, LLPDataset

# ------------------------------------------------------------------------------------------- minimal releases
AVE_ROWS = ["Bark&abcdefghijk&good&0&4", "Cat&bcdefghijkl&good&2&10", "Goat&cdefghijklm&good&0&10"]


def ave_root(tmp_path: Path, train: list[str] | None = None) -> Path:
    root = tmp_path / "ave"
    (root / "AVE").mkdir(parents=True)
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(AVE_ROWS) + "\n")
    for name, rows in (("trainSet.txt", AVE_ROWS[:2] if train is None else train), ("valSet.txt", AVE_ROWS[2:]),
                       ("testSet.txt", AVE_ROWS[2:])):
        (root / name).write_text("".join(r + "\n" for r in rows))
    return root


def llp_root(tmp_path: Path) -> Path:
    root = tmp_path / "llp"
    (root / "LLP_dataset" / "video").mkdir(parents=True)
    weak = "\t".join(WEAK_HEADER) + "\n" + "abcdefghijk_0_10\tSpeech,Dog\nbcdefghijkl_5_15\tCat\n"
    for name in ("AVVP_train.csv", "AVVP_val_pd.csv", "AVVP_test_pd.csv"):
        (root / name).write_text(weak)
    evals = "\t".join(EVAL_HEADER) + "\n" + "abcdefghijk_0_10\t0\t4\tSpeech\nbcdefghijkl_5_15\t2\t6\tCat\n"
    for name in ("AVVP_eval_audio.csv", "AVVP_eval_visual.csv"):
        (root / name).write_text(evals)
    return root


S4_CSV = "name,start_time,category,split\nvid_a,0,dog_barking,train\nvid_b,3,helicopter,val\nvid_c,2,race_car,test\n"


def avs_root(tmp_path: Path, text: str = S4_CSV, setting: str = "s4") -> Path:
    root = tmp_path / "avs"
    for sub in ("visual_frames", "audio_wav", "gt_masks"):
        (root / f"{setting}_data" / sub).mkdir(parents=True)
    (root / f"{setting}_meta_data.csv").write_text(text)
    return root


def avqa_item(qid: int, video: str, answer: str = "yes") -> dict:
    return {"video_id": video, "question_id": qid, "type": "[\"Audio\", \"Counting\"]",
            "question_content": "Is the <Object> playing?", "templ_values": "[\"violin\"]", "question_deleted": 0,
            "anser": answer}


def avqa_root(tmp_path: Path, train: list | str | None = None) -> Path:
    root = tmp_path / "avqa"
    items = [avqa_item(1, "00000001"), avqa_item(2, "00000002", "no"), avqa_item(3, "00000003")]
    for folder in ("json", "json_update"):
        for split in ("train", "val", "test"):
            path = root / folder / f"avqa-{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            content = items if split != "train" or train is None else train
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def build_all(dm) -> None:
    for split in ("train", "val", "test"):
        dm.build_dataset(split)


def test_minimal_releases_are_valid(tmp_path: Path) -> None:
    build_all(AVEDataModule(str(ave_root(tmp_path))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLP quirk report (videos without rows)
        build_all(LLPDataModule(str(llp_root(tmp_path))))
    build_all(AVSBenchDataModule(str(avs_root(tmp_path))))
    build_all(MusicAVQADataModule(str(avqa_root(tmp_path))))


def raises_naming(path: Path, match: str, line: int | None = None):
    """``pytest.raises(AnnotationError)`` whose message names ``path`` (and ``line``) and matches ``match``."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(AnnotationError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.path == str(path) and str(path) in str(err), str(err)
            if line is not None:
                assert err.line == line, str(err)
            return out

    return _Check()


# ------------------------------------------------------------------------------------------------ encodings
def test_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    root = ave_root(tmp_path)
    (root / "valSet.txt").write_bytes(b"Goat&cdefghijklm&good&0&10\nBark&caf\xe9ghijklm&good&0&4\n")
    with raises_naming(root / "valSet.txt", "not UTF-8", line=2):
        AVEDataModule(str(root)).build_dataset("val")
    root = llp_root(tmp_path)
    (root / "AVVP_train.csv").write_bytes(b"filename\tevent_labels\n\xff\xfeabcdefghijk_0_10\tSpeech\n")
    with raises_naming(root / "AVVP_train.csv", "not UTF-8", line=2):
        LLPDataModule(str(root)).build_dataset("train")
    root = avqa_root(tmp_path)
    path = root / "json_update" / "avqa-val.json"
    path.write_bytes(path.read_bytes().replace(b"playing", b"pl\x80ying", 1))
    with raises_naming(path, "not UTF-8", line=1):
        MusicAVQADataModule(str(root)).build_dataset("val")


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    root = ave_root(tmp_path)
    (root / "Annotations.txt").write_bytes(b"\xef\xbb\xbf" + (root / "Annotations.txt").read_bytes())
    assert len(AVEDataModule(str(root)).build_dataset("train")) == 2


# ---------------------------------------------------------------------------------------------- empty files
@pytest.mark.parametrize("setting", ["s4", "ms3"])
def test_empty_avsbench_csv(tmp_path: Path, setting: str) -> None:
    root = avs_root(tmp_path, "", setting)
    with raises_naming(root / f"{setting}_meta_data.csv", "empty file", line=1):
        AVSBenchDataModule(str(root), setting=setting).build_dataset("train")


def test_empty_ave_train_split_refuses_to_fit(tmp_path: Path) -> None:
    root = ave_root(tmp_path, train=[])
    dm = AVEDataModule(str(root))
    with raises_naming(root / "trainSet.txt", "no train rows"):
        dm.setup("fit")  # before: 0 batches, fit "succeeded" and test.json scored a random model


def test_zero_byte_llp_csv(tmp_path: Path) -> None:
    root = llp_root(tmp_path)
    (root / "AVVP_val_pd.csv").write_bytes(b"")
    with raises_naming(root / "AVVP_val_pd.csv", "expected the TAB-separated header", line=1):
        LLPDataModule(str(root)).build_dataset("val")
    (root / "AVVP_val_pd.csv").write_text("\t".join(WEAK_HEADER) + "\n")  # header only
    with raises_naming(root / "AVVP_val_pd.csv", "no val videos"):
        LLPDataModule(str(root)).build_dataset("val")


def test_avs_split_without_rows(tmp_path: Path) -> None:
    root = avs_root(tmp_path, S4_CSV.replace(",test\n", ",val\n"))
    with raises_naming(root / "s4_meta_data.csv", "no rows with split 'test'"):
        AVSBenchDataModule(str(root)).build_dataset("test")


# ------------------------------------------------------------------------------------------------------ JSON
def test_deeply_nested_json(tmp_path: Path) -> None:
    root = avqa_root(tmp_path, train="[" * 100_000 + "]" * 100_000)
    with raises_naming(root / "json" / "avqa-train.json", "nested too deeply"):
        MusicAVQADataModule(str(root)).build_dataset("val")


def test_question_id_beyond_int64(tmp_path: Path) -> None:
    root = avqa_root(tmp_path, train=[avqa_item(2**70, "00000001"), avqa_item(2, "00000002")])
    with raises_naming(root / "json_update" / "avqa-train.json", r"question_id must lie in \[0, 2\*\*63 - 1\]",
                       line=0):
        MusicAVQADataModule(str(root)).build_dataset("train")


def test_negatives_need_two_videos_names_the_file(tmp_path: Path) -> None:
    root = avqa_root(tmp_path, train=[avqa_item(1, "00000001"), avqa_item(2, "00000001", "no")])
    with raises_naming(root / "json_update" / "avqa-train.json", "at least two distinct videos"):
        MusicAVQADataModule(str(root)).build_dataset("train")
    assert len(MusicAVQADataModule(str(root), negatives=False).build_dataset("train")) == 2


def test_duplicated_train_question_ids_warn_every_time_the_file_changes(tmp_path: Path) -> None:
    dup = [avqa_item(1, "00000001"), avqa_item(1, "00000002", "no"), avqa_item(3, "00000003")]
    root = avqa_root(tmp_path, train=dup)
    path = root / "json_update" / "avqa-train.json"
    for _ in range(2):  # the same path rewritten (new mtime): warned again, not silenced by the first warning
        with pytest.warns(UserWarning, match=rf"{path}: 1 question_id\(s\) occur more than once \(1\)"):
            assert len(MusicAVQADataModule(str(root)).build_dataset("train")) == 3  # keep (official) keeps all
        path.write_text(json.dumps(dup, indent=1))
    with raises_naming(path, "occur more than once"):
        MusicAVQADataModule(str(root), duplicate_question_ids="error").build_dataset("train")


# ------------------------------------------------------------------------------------------ misleading before
def test_duplicated_ave_split_row_says_so(tmp_path: Path) -> None:
    root = ave_root(tmp_path, train=[AVE_ROWS[0], AVE_ROWS[1], AVE_ROWS[0]])
    with raises_naming(root / "trainSet.txt", r"repeats line 1 of the split file .* holds 1 copy", line=3):
        AVEDataModule(str(root)).build_dataset("train")
    root = ave_root(tmp_path / "other", train=["Bark&zzzzzzzzzzz&good&0&4"])
    with raises_naming(root / "trainSet.txt", f"row not found in {root / 'Annotations.txt'}", line=1):
        AVEDataModule(str(root)).build_dataset("train")


def test_s4_row_with_an_extra_field(tmp_path: Path) -> None:
    root = avs_root(tmp_path, S4_CSV.replace("vid_b,3,helicopter,val", "vid_b,3,helicopter,extra,val"))
    with raises_naming(root / "s4_meta_data.csv", "expected 4 comma-separated fields .* got 5", line=3):
        AVSBenchDataModule(str(root)).build_dataset("val")


# ---------------------------------------------------------------------------------------- silent before
def test_unknown_s4_category(tmp_path: Path) -> None:
    root = avs_root(tmp_path, S4_CSV.replace("race_car", "racecar"))
    with raises_naming(root / "s4_meta_data.csv", "unknown S4 category 'racecar'", line=4):
        AVSBenchDataModule(str(root)).build_dataset("train")


@pytest.mark.parametrize("value", ["-1", "nan", "1_0", ""])
def test_bad_s4_start_time(tmp_path: Path, value: str) -> None:
    root = avs_root(tmp_path, S4_CSV.replace("vid_b,3,", f"vid_b,{value},"))
    with raises_naming(root / "s4_meta_data.csv", "start_time must be a number of seconds >= 0", line=3):
        AVSBenchDataModule(str(root)).build_dataset("train")


@pytest.mark.parametrize("times", ["-1&4", "1_0&10", "\u0661&4", "+1&4"])
def test_ave_times_are_ascii_whole_seconds(tmp_path: Path, times: str) -> None:
    root = ave_root(tmp_path, train=[f"Bark&abcdefghijk&good&{times}"])
    with raises_naming(root / "trainSet.txt", "must be integers", line=1):
        AVEDataModule(str(root)).build_dataset("train")


def test_llp_eval_times_are_ascii_whole_seconds(tmp_path: Path) -> None:
    root = llp_root(tmp_path)
    path = root / "AVVP_eval_visual.csv"
    path.write_text(path.read_text().replace("\t2\t6\t", "\t-2\t6\t"))
    with raises_naming(path, "onset/offset must be integer seconds", line=3):
        LLPDataModule(str(root)).build_dataset("test")


# ------------------------------------------------------------------------------------- feature files (media)
@pytest.mark.parametrize("content", [b"", b"\x93NUMPY garbage", b"not an npy file at all", "pickle"])
def test_corrupt_llp_feature_file_is_a_decode_error(tmp_path: Path, content) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    if content == "pickle":  # an object array: np.load refuses it (allow_pickle=False) with a ValueError
        np.save(feats / "abcdefghijk.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        (feats / "abcdefghijk.npy").write_bytes(content)
    table = pd.DataFrame({"filename": ["abcdefghijk_0_10"], "video_id": ["abcdefghijk"],
                          "label_mask": np.array([1], dtype=np.int64), "line": np.array([2], dtype=np.int64)})
    ds = LLPDataset(str(tmp_path), table, None, None, image_size=32, audio=LogMelConfig(n_mels=16),
                    st_feature_dir=str(feats))
    with pytest.raises(DecodeError, match="abcdefghijk.npy: cannot read the spatio-temporal features"):
        ds._st_features(0)  # a DecodeError is what on_decode_error="skip" skips (tests/test_avvp_data.py)


def test_annotation_error_pickles() -> None:
    err = AnnotationError("/x/a.csv", "bad", 3, "row", "question_id 7")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "/x/a.csv, row 3 (question_id 7): bad" and isinstance(again, ValueError)


@pytest.mark.parametrize("video", ["../00000001", ".hidden", "00000001\n"])
def test_video_id_that_cannot_name_a_cache_file(tmp_path: Path, video: str) -> None:
    root = avqa_root(tmp_path, train=[avqa_item(1, "00000002"), avqa_item(2, video, "no")])
    path = root / "json_update" / "avqa-train.json"
    with raises_naming(path, "cannot name a cache file", line=1):
        MusicAVQADataModule(str(root), cache_dir=str(tmp_path / "cache")).build_dataset("train")


def test_avsbench_header_may_hold_any_names(tmp_path: Path) -> None:
    root = avs_root(tmp_path, S4_CSV.replace("name,start_time", "line,start_time"))  # a column called "line"
    table = AVSBenchDataModule(str(root)).table()
    assert table["video_id"].tolist() == ["vid_a", "vid_b", "vid_c"] and table["line"].tolist() == [2, 3, 4]
