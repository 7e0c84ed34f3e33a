"""``predict`` on a folder of your own mp4 files for AVS and AVQA, through the real CLI (subprocesses).

A tiny model of each task is fitted for one batch (the CLI in-process); ``predict --data.init_args.predict_dir``
then runs as a subprocess on generated mp4 files, and its outputs are compared with what the same checkpoint gives
on the same clips through the task's test pipeline: for AVS a release-layout copy of the clips (the frames the
official extraction would keep, decoded here independently, as PNGs; the decoded audio as a wav), for AVQA the
release's own test questions and videos. The bad-input errors are checked in-process (cheap) on the DataModules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import finish_cli as finish, start_cli as start, task_fit_args

pytestmark = [pytest.mark.xdist_group("predict_folder"), pytest.mark.filterwarnings("ignore:.*RANDOM weights")]
ONE_BATCH = {"trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1, "run.router_usage": "false"}
AVQA_SEGMENTS = 2
AVQA_FAST = {"data.init_args.cache_dir": "null", "data.init_args.negatives": "false",
             "data.init_args.num_segments": AVQA_SEGMENTS}
OFFICIAL_FRAME_OFFSET = 15 / 16  # OpenNLPLab/AVSBench preprocess_s4.py: frame int(l * fps + 15/16 * fps) of second l


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def predict_args(fit_args: list[str], folder: Path, *extra: str) -> list[str]:
    """The fit's arguments for ``predict`` on ``folder``: no release root, no fit-only options."""
    keep = [a for a in fit_args if not a.startswith(("--data.init_args.root=", "--trainer.max_epochs",
                                                     "--trainer.limit_", "--run.test_after_fit"))]
    return [*keep, "--data.init_args.root=/nowhere", f"--data.init_args.predict_dir={folder}", *extra]


# ------------------------------------------------------------------------------------------------ own videos


def write_clips(folder: Path, sizes: list[tuple[int, int]], fps: int = 8, seconds: float = 5.0) -> list[Path]:
    """Real H.264/AAC mp4 files whose every frame differs (a moving square over noise) with a changing tone."""
    from avmoe.datamodules.synthetic.media import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate(sizes):
        n = int(seconds * fps)
        frames = rng.integers(0, 60, (n, h, w, 3), dtype=np.uint8)
        for i in range(n):
            y, x = (i * 5 + 13 * k) % (h - h // 3), (i * 7 + 29 * k) % (w - w // 3)
            frames[i, y:y + h // 3, x:x + w // 3] = (220, 40 + 30 * k, 255 - 9 * i % 255)
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (300 + 200 * k + 120 * np.floor(t)) * t) + 0.02 * rng.standard_normal(t.size)
        paths.append(folder / f"clip {k}.mp4")
        write_mp4(paths[-1], frames, fps, audio.astype(np.float32), 16000)
    return paths


def official_frames(path: Path) -> np.ndarray:
    """The five frames AVSBench's extraction keeps (every frame decoded, then frame int(l*fps + 15/16*fps))."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = round(float(stream.average_rate))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    picks = [min(int(l * fps + OFFICIAL_FRAME_OFFSET * fps), len(frames) - 1) for l in range(5)]
    return np.stack([frames[i] for i in picks])


def release_copy(clips: list[Path], root: Path, sample_rate: int) -> Path:
    """An S4 release (test split) holding the clips as the release would: 224x224 PNG frames, a wav per clip."""
    import soundfile as sf

    from avmoe.datamodules import read_audio, resize_frames

    data = root / "s4_data"
    lines = ["video_name,start_time,category,split"]
    for clip in clips:
        vid, category = clip.stem, "baby_laughter"
        lines.append(f"{vid},0,{category},test")
        frames = resize_frames(official_frames(clip), 224).permute(0, 2, 3, 1).numpy()  # as cv2.resize to 224
        for sub in ("visual_frames", "gt_masks"):
            (data / sub / "test" / category / vid).mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(data / "visual_frames" / "test" / category / vid / f"{vid}_{t + 1}.png")
            Image.fromarray(np.zeros((224, 224), np.uint8)).save(data / "gt_masks" / "test" / category / vid /
                                                                 f"{vid}_{t + 1}.png")
        (data / "audio_wav" / "test" / category).mkdir(parents=True, exist_ok=True)
        sf.write(data / "audio_wav" / "test" / category / f"{vid}.wav", read_audio(clip, sample_rate), sample_rate,
                 subtype="FLOAT")  # lossless: the test split reads the very waveform of the mp4
    (root / "s4_meta_data.csv").write_text("\n".join(lines) + "\n")
    return root


def avqa_questions(release: Path) -> list[dict[str, Any]]:
    """Release test questions on two videos, plus one as a user writes it (no question_id/type/answer)."""
    items = json.loads((release / "json_update" / "avqa-test.json").read_text(encoding="utf-8"))
    videos = list(dict.fromkeys(q["video_id"] for q in items))[:2]
    chosen = [q for q in items if q["video_id"] in videos][:4]
    templated = next((q for q in chosen if "<" in q["question_content"]), chosen[0])
    user = {"video_id": templated["video_id"], "question_content": templated["question_content"],
            "templ_values": json.loads(templated["templ_values"])}
    return [*chosen, user]


def fit_in_process(args: list[str]) -> None:
    """The CLI's fit in this process (the subprocess start-up, ~6 s of imports, is paid by the predicts only)."""
    from unittest import mock

    from avmoe.cli import cli_main

    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(["fit", *args])


@pytest.fixture(scope="module")
def runs(avs_release, avqa_release, tmp_path_factory) -> dict[str, Any]:
    """One-batch fits of the AVS and AVQA demo models; ``predict`` on folders of own videos as subprocesses, each
    started as soon as its checkpoint exists."""
    work = tmp_path_factory.mktemp("predict_folder")
    fit = {"avs": task_fit_args("avs", avs_release, work / "runs", name="avs", **ONE_BATCH),
           "avqa": task_fit_args("avqa", avqa_release, work / "runs", name="avqa", **ONE_BATCH, **AVQA_FAST)}
    best = {task: work / "runs" / task / "checkpoints" / "best.ckpt" for task in fit}

    avs_dir = work / "my clips"
    clips = write_clips(avs_dir, [(224, 224), (224, 224), (144, 192)])
    (avs_dir / "broken.mp4").write_bytes(b"not a video at all")  # skipped (on_decode_error: skip)
    (avs_dir / "notes.txt").write_text("not a video")
    avqa_dir = work / "my avqa videos"
    avqa_dir.mkdir()
    questions = avqa_questions(avqa_release)
    for vid in {q["video_id"] for q in questions}:
        shutil.copy(avqa_release / "video" / f"{vid}.mp4", avqa_dir / f"{vid}.mp4")
    questions_file = work / "my questions.json"
    questions_file.write_text(json.dumps(questions), encoding="utf-8")

    fit_in_process(fit["avs"])
    predicting = {"avs": start("predict", *predict_args(fit["avs"], avs_dir, f"--ckpt_path={best['avs']}",
                                                        "--data.init_args.on_decode_error=skip"), cwd=work)}
    fit_in_process(fit["avqa"])
    predicting["avqa"] = start("predict", *predict_args(fit["avqa"], avqa_dir, f"--ckpt_path={best['avqa']}",
                                                        f"--data.init_args.predict_questions={questions_file}",
                                                        "--model.init_args.predict_top_k=3"), cwd=work)
    done = {task: ok(finish(proc)) for task, proc in predicting.items()}
    return {"work": work, "best": best, "done": done, "clips": clips, "avs_dir": avs_dir, "avqa_dir": avqa_dir,
            "questions": questions, "questions_file": questions_file,
            "predictions": {task: work / "runs" / task / "predictions" for task in fit}}


@torch.no_grad()
def _forward(task_cls: type, ckpt: Path, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    from avmoe.datamodules import collate

    model = task_cls.load_from_checkpoint(ckpt, map_location="cpu").eval()
    return model(collate(samples))[1]


@pytest.mark.slow
def test_avs_predict_dir_writes_masks_and_probabilities_equal_to_the_test_pipeline(runs, tmp_path):
    from avmoe.datamodules import AVSBenchDataModule, LogMelConfig
    from avmoe.tasks.avs import AVSTask
    from avmoe.tasks.predictions import read_probability_png

    folder = runs["predictions"]["avs"]
    out = runs["done"]["avs"].stdout + runs["done"]["avs"].stderr
    assert f"3 predictions written to {folder / 'avs_predictions.json'}" in out
    assert f"in {folder / 'avs_masks'}/<video_id>/" in out
    assert "broken.mp4" in out, "the undecodable file is named when it is skipped"
    payload = json.loads((folder / "avs_predictions.json").read_text())
    assert payload["checkpoint"] == str(runs["best"]["avs"].resolve())
    records = {r["video_id"]: r for r in payload["predictions"]}
    assert sorted(records) == ["clip 0", "clip 1", "clip 2"]
    assert records["clip 2"]["frame_size"] == [144, 192] and records["clip 0"]["frame_size"] == [224, 224]

    reference_root = release_copy(runs["clips"], tmp_path / "s4_copy", LogMelConfig().sample_rate)
    dm = AVSBenchDataModule(root=str(reference_root), setting="s4", num_workers=0, image_size=224,
                            audio=LogMelConfig(n_mels=32))
    test = dm.dataset("test")
    probs = torch.sigmoid(_forward(AVSTask, runs["best"]["avs"], [test[i] for i in range(len(test))])["logits"])
    assert (probs[0] - probs[1]).abs().max() > 1e-2, "different clips must give different maps for the check to bite"
    for i, vid in enumerate(test.video_ids):
        record = records[str(vid)]
        assert len(record["masks"]) == len(record["probabilities"]) == 5
        for t in range(5):
            assert (folder / "avs_masks" / str(vid) / f"{t + 1}.png").is_file()
            mask = np.asarray(Image.open(folder / record["masks"][t]))
            prob = read_probability_png(folder / record["probabilities"][t])
            assert mask.shape == prob.shape == (224, 224) and set(np.unique(mask)) <= {0, 255}
            assert 0.0 <= prob.min() and prob.max() <= 1.0
            ref = probs[i, t].numpy()
            # float32 noise of another batch composition reaches ~1e-4; frames at l + 0.5 s instead differ by ~5e-2
            np.testing.assert_allclose(prob, ref, atol=1e-3)
            decided = np.abs(ref - 0.5) > 2e-3
            assert np.array_equal((mask > 0)[decided], (ref > 0.5)[decided])
            assert record["foreground"][t] == pytest.approx((mask > 0).mean(), abs=1e-6)


@pytest.mark.slow
def test_avqa_predict_questions_answers_equal_the_test_pipeline(runs, avqa_release):
    from avmoe.datamodules import LogMelConfig, MusicAVQADataModule
    from avmoe.tasks.avqa import AVQATask

    path = runs["predictions"]["avqa"] / "avqa_predictions.json"
    out = runs["done"]["avqa"].stdout + runs["done"]["avqa"].stderr
    questions = runs["questions"]
    assert f"{len(questions)} predictions written to {path}" in out
    payload = json.loads(path.read_text())
    assert payload["checkpoint"] == str(runs["best"]["avqa"].resolve())
    records = payload["predictions"]
    assert [r["index"] for r in records] == list(range(len(questions)))
    assert [r["video_id"] for r in records] == [q["video_id"] for q in questions]
    assert records[-1]["question_id"] == len(questions) - 1 and records[-1]["label"] is None  # the user's question
    assert records[-1]["question_type"] is None
    assert all(r["label"] == q["anser"] for r, q in zip(records, questions[:-1]))

    dm = MusicAVQADataModule(root=str(avqa_release), num_workers=0, num_segments=AVQA_SEGMENTS, clip_seconds=10.0,
                             image_size=64, audio=LogMelConfig(n_mels=32), negatives=False)
    test = dm.dataset("test")
    rows = [int(np.flatnonzero(test.question_ids == q["question_id"])[0]) for q in questions[:-1]]
    user = questions[-1]  # written from one of the release questions: the same answer
    rows.append(next(row for row, q in zip(rows, questions) if (q["video_id"], q["question_content"]) ==
                     (user["video_id"], user["question_content"])))
    probs = _forward(AVQATask, runs["best"]["avqa"], [test[i] for i in rows])["answer_logits"].softmax(-1)
    top_p, top_i = probs.topk(3, dim=-1)
    vocab = payload["answer_vocab"]
    for r, p, i, sample in zip(records, top_p, top_i, (test[j] for j in rows)):
        assert r["question"] == sample["question_text"]
        assert r["answer"] == vocab[int(i[0])] and r["score"] == pytest.approx(float(p[0]), abs=1e-5)
        assert [a["answer"] for a in r["top_k"]] == [vocab[int(k)] for k in i]
        assert [a["score"] for a in r["top_k"]] == pytest.approx(p.tolist(), abs=1e-5)
        assert 0.0 < r["score"] <= 1.0 and r["top_k"][0]["score"] >= r["top_k"][-1]["score"]


# ------------------------------------------------------------------------------------------- bad input, in-process


def test_avs_folder_errors_name_the_file(tmp_path):
    from avmoe.datamodules import AVSBenchDataModule, DecodeError
    from avmoe.errors import user_error_message

    dm = AVSBenchDataModule(root="/nowhere", num_workers=0, predict_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no .mp4 file in {tmp_path}"):
        dm.build_folder_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.build_folder_dataset(str(tmp_path / "absent"))
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    dataset = dm.build_folder_dataset(str(tmp_path))
    with pytest.raises(DecodeError, match="broken.mp4") as err:
        dataset[0]
    assert str(tmp_path / "broken.mp4") in user_error_message(err.value)
    short = write_clips(tmp_path / "short", [(64, 64)], seconds=3.0)[0]
    with pytest.raises(DecodeError, match="clip 0.mp4"):
        dm.build_folder_dataset(str(short.parent))[0]


def test_avqa_questions_errors_name_the_file_and_the_entry(avqa_release, tmp_path):
    from avmoe.datamodules import MusicAVQADataModule
    from avmoe.datamodules.annotations import AnnotationError
    from avmoe.errors import user_error_message

    folder = tmp_path / "videos"
    folder.mkdir()
    items = json.loads((avqa_release / "json_update" / "avqa-test.json").read_text(encoding="utf-8"))
    valid = next(q for q in items if "<" in q["question_content"])  # a templated release question
    vid = valid["video_id"]
    shutil.copy(avqa_release / "video" / f"{vid}.mp4", folder / f"{vid}.mp4")
    questions = tmp_path / "q.json"

    def dm(path: Path = questions) -> MusicAVQADataModule:
        return MusicAVQADataModule(root=str(avqa_release), num_workers=0, predict_dir=str(folder),
                                   predict_questions=str(path), cache_dir=None)

    def write(*entries: dict[str, Any]) -> None:
        questions.write_text(json.dumps(list(entries)), encoding="utf-8")

    with pytest.raises(FileNotFoundError, match=f"questions file {tmp_path / 'absent.json'} not found"):
        dm(tmp_path / "absent.json").build_folder_dataset(str(folder))
    write(valid)
    assert len(dm().build_folder_dataset(str(folder))) == 1
    write(valid, {**valid, "question_id": 5, "question_content": "Zebra " + valid["question_content"]})
    with pytest.raises(AnnotationError, match=r"q.json, row 1 \(question_id 5\): word\(s\) \['Zebra'\]") as err:
        dm().build_folder_dataset(str(folder))
    assert "q.json, row 1" in user_error_message(err.value)
    write({**valid, "video_id": "elsewhere", "question_id": 7})
    with pytest.raises(AnnotationError, match=r"row 0 \(question_id 7\): video_id 'elsewhere' names no mp4 file"):
        dm().build_folder_dataset(str(folder))
    write({"video_id": vid, "question_content": valid["question_content"]})  # templ_values left out
    with pytest.raises(AnnotationError, match=r"row 0: .*placeholder\(s\) but templ_values has 0"):
        dm().build_folder_dataset(str(folder))
    write()
    with pytest.raises(AnnotationError, match="no question"):
        dm().build_folder_dataset(str(folder))
    with pytest.raises(ValueError, match="needs both data.predict_dir .* and data.predict_questions"):
        MusicAVQADataModule(root=str(avqa_release), predict_dir=str(folder))
