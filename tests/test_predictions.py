"""``predict`` writes per-sample prediction files into the run folder (every task; AVQA's are in its own test)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from avmoe.cli import cli_main
from avmoe.datamodules.ave import AVE_CATEGORIES
from avmoe.datamodules.llp import LLP_CATEGORIES
from avmoe.tasks.predictions import event_runs, gather_records, read_probability_png
from tests.helpers import task_fit_args
from tests.test_callbacks import make_datamodule, make_task

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")


def test_event_runs_and_gathering():
    assert event_runs(np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)) == [(1, 3), (4, 5), (7, 10)]
    assert event_runs(np.zeros(10, dtype=bool)) == []
    padded = [{"index": 2, "v": "a"}, {"index": 0, "v": "b"}, {"index": 2, "v": "a"}]  # sampler padding
    assert gather_records(padded, world_size=1) == [{"index": 0, "v": "b"}, {"index": 2, "v": "a"}]


def test_ave_predictions_file_equals_what_predict_returns(ave_release, tmp_path):
    task = make_task()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    returned = trainer.predict(task, make_datamodule(ave_release))
    payload = json.loads((tmp_path / "predictions" / "ave_predictions.json").read_text())
    records = payload["predictions"]
    index = torch.cat([r["index"] for r in returned]).tolist()
    segments = torch.cat([r["segments"] for r in returned]).tolist()
    assert payload["num_samples"] == len(records) == len(index) and [r["index"] for r in records] == sorted(index)
    by_index = dict(zip(index, segments))
    names = (*AVE_CATEGORIES, "background")
    for r in records:
        assert r["segment_ids"] == by_index[r["index"]]
        assert r["segments"] == [names[c] for c in r["segment_ids"]]


def _predict(task: str, release: Path, runs: Path) -> Path:
    args = task_fit_args(task, release, runs, name=task)
    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(["predict", *args])
    return runs / task / "predictions"


@pytest.mark.parametrize("task, release_fixture", [("ave", "ave_release"), ("avvp", "llp_release"),
                                                   ("avs", "avs_release")])
def test_cli_predict_writes_the_task_file_in_the_run_folder(task, release_fixture, request, in_tmp):
    release = request.getfixturevalue(release_fixture)
    folder = _predict(task, release, in_tmp / "runs")
    payload = json.loads((folder / f"{task}_predictions.json").read_text())
    records = payload["predictions"]
    assert records and [r["index"] for r in records] == list(range(len(records))), "every test sample, once"
    if task == "ave":
        assert all(len(r["segments"]) == 10 and set(r["segments"]) <= {*AVE_CATEGORIES, "background"}
                   for r in records)
        assert all(r["event"] in AVE_CATEGORIES and 0.0 <= r["event_score"] <= 1.0 for r in records)
    elif task == "avvp":
        assert any(r["events"] for r in records), "the check below must see events"
        for r in records:
            assert set(r["labels"]) <= set(LLP_CATEGORIES)
            assert set(r["label_scores"]) == set(r["labels"]) and all(p >= 0.5 for p in r["label_scores"].values())
            for e in r["events"]:
                assert e["modality"] in ("audio", "visual") and 0 <= e["onset"] < e["offset"] <= 10
                assert e["event"] in r["labels"], "segment predictions are masked by the video-level labels"
                assert 0.5 <= e["score"] <= 1.0, "an event's segments all passed the 0.5 threshold"
    else:
        assert any(f > 0 for r in records for f in r["foreground"]), "the check below must see foreground"
        for r in records:
            assert len(r["masks"]) == len(r["probabilities"]) == 5
            for file, prob_file, fraction in zip(r["masks"], r["probabilities"], r["foreground"]):
                png = np.asarray(Image.open(folder / file))
                assert png.shape == (224, 224) and set(np.unique(png)) <= {0, 255}
                assert (png > 0).mean() == pytest.approx(fraction, abs=1e-6)
                prob = read_probability_png(folder / prob_file)  # the mask is p > 0.5 (up to the 16-bit step)
                decided = np.abs(prob - 0.5) > 1e-4
                assert prob.shape == (224, 224) and np.array_equal((prob > 0.5)[decided], (png > 0)[decided])


def _gather_worker(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # DistributedSampler over 5 samples on 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and pads with 0.
    mine = [[0, 2, 4], [1, 3, 0]][rank]
    records = gather_records([{"index": i, "rank": rank} for i in mine], world_size=2)
    torch.save(records, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_gather_records_over_two_ranks_keeps_each_sample_once(tmp_path):
    import torch.multiprocessing as mp  # noqa: PLC0415

    out = tmp_path / "records"
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert rank0 == rank1, "every rank builds the same list"
    assert [r["index"] for r in rank0] == [0, 1, 2, 3, 4]
    assert [r["rank"] for r in rank0] == [0, 1, 0, 1, 0]
