"""CRMT's certified bound per test sample (the CSV beside the metrics JSON, DDP-gathered) and CRMT's scope:
tasks whose head is not a linear fusion of per-modality features refuse ``crmt: true`` and the callback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from avmoe.callbacks import CRMT
from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.robustness.setting import EvalSetting
from avmoe.tasks.ave import video_class
from tests.test_callbacks import imbalanced_release, make_datamodule, make_trainer  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _task():
    from avmoe.models.presets import tiny_config
    from avmoe.tasks.ave import AVETask
    from tests.test_callbacks import HEAD

    torch.manual_seed(0)
    task = AVETask(backbone=tiny_config(), head=HEAD, crmt=True)
    with torch.no_grad():  # as after stage 2: Lipschitz constants estimated, a^m moved away from 0.1
        task.crmt_fusion.lipschitz.copy_(torch.rand_like(task.crmt_fusion.lipschitz) + 0.5)
        for a in task.crmt_fusion.a.values():
            a.add_(0.05 * torch.randn_like(a))
    return task


def _expected(task, dm) -> dict[int, dict]:
    """The bound of every test clip with a class, from the model's outputs and the CRMT formula written out."""
    fusion, out = task.crmt_fusion, {}
    task.eval()
    dm.setup("test")
    for batch in dm.test_dataloader():
        with torch.no_grad():
            _, outputs = task(batch)
        cls, has_event = video_class(batch["label"])
        fused = outputs["event_scores"]
        for i in has_event.nonzero().flatten().tolist():
            y = int(cls[i])
            j = max((k for k in range(fused.shape[1]) if k != y), key=lambda k: float(fused[i, k]))
            numer, denom = float(fusion.fc.bias.detach()[y] - fusion.fc.bias.detach()[j]), 0.0
            for row, m in enumerate(fusion.modalities):
                h, a, lip = outputs[f"crmt_{m}"][i], fusion.a[m], fusion.lipschitz[row]
                numer += float(a[y] * h[y] - a[j] * h[j])
                denom += float(a[y] * lip[y] + a[j] * lip[j]) ** 2
            out[int(batch["index"][i])] = {"video_id": batch["video_id"][i], "label": y,
                                           "prediction": int(fused[i].argmax()), "runner_up": j,
                                           "bound": numer / math.sqrt(denom)}
    return out


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check(rows: list[dict], expected: dict[int, dict]) -> None:
    assert [int(r["index"]) for r in rows] == sorted(expected)  # one row per clip with a class, sorted, no repeats
    for r in rows:
        e = expected[int(r["index"])]
        assert (r["video_id"], int(r["label"]), int(r["prediction"]), int(r["runner_up"])) == \
            (e["video_id"], e["label"], e["prediction"], e["runner_up"])
        assert float(r["bound"]) == pytest.approx(e["bound"], rel=1e-4, abs=1e-6)


def test_test_writes_every_clips_bound_beside_the_metrics_json(imbalanced_release, tmp_path):
    task, dm = _task(), make_datamodule(imbalanced_release, batch_size=1)
    expected = _expected(task, dm)
    labels = torch.as_tensor(dm.dataset("test").labels)  # (N, T) segment classes of the split
    assert len(expected) == int(video_class(labels)[1].sum()) == len(labels)  # every test clip has an event class
    dm_test = make_datamodule(imbalanced_release, batch_size=1)
    metrics_dir = tmp_path / "metrics"
    trainer = make_trainer(tmp_path, [CRMT(stage=2), MetricsJSON(str(metrics_dir), subcommand="test")])
    trainer.test(task, dm_test, verbose=False)
    _check(_read(metrics_dir / "crmt_bound_test_test.csv"), expected)
    payload = json.loads((metrics_dir / "test_test.json").read_text())
    assert payload["files"] == {"crmt_bound": "crmt_bound_test_test.csv"}
    mean = sum(e["bound"] for e in expected.values()) / len(expected)
    assert payload["metrics"]["test/crmt_bound"] == pytest.approx(mean, rel=1e-4)

    assert CRMT._reports(task)
    task.eval_setting = EvalSetting(missing="audio")  # under a robustness setting nothing is certified
    assert not CRMT._reports(task)
    task.eval_setting = None


# ------------------------------------------------------------------------------------------------------- scope
def _tiny(cls, **kwargs):
    from avmoe.models.presets import tiny_config

    return cls(backbone=tiny_config(), **kwargs)


@pytest.mark.parametrize("name", ["AVVPTask", "AVSTask", "AVQATask"])
def test_tasks_without_a_linear_fusion_head_refuse_crmt(name):
    import avmoe.tasks as tasks

    cls = getattr(tasks, name)
    with pytest.raises(ValueError, match="crmt: true is not available.*linear fusion of per-modality features"):
        cls(crmt=True)  # fails before anything is built


def test_crmt_callback_refuses_them_at_setup_with_the_reason():
    from avmoe.models.heads.avvp import AVVPHeadConfig
    from avmoe.tasks import AVVPTask

    task = _tiny(AVVPTask, head=AVVPHeadConfig(dim=32, num_heads=2, depth_audio=1, depth_visual=1, depth_av=1))
    for stage in ("fit", "test"):
        with pytest.raises(ValueError, match="AVVPTask has no CRMT fusion head.*MGN.*multi-label"):
            CRMT(stage=2).setup(None, task, stage)


def test_crmt_true_on_avvp_fails_through_the_cli(tmp_path):
    from avmoe.cli import cli_main
    from tests.helpers import CONFIGS

    with pytest.raises(ValueError, match="AVVPTask: crmt: true is not available"):
        cli_main(["fit", "--config", str(CONFIGS / "avvp.yaml"), "--config",
                  str(CONFIGS / "callbacks" / "crmt_stage1.yaml"), f"--data.init_args.root={tmp_path}",
                  f"--run.root={tmp_path / 'runs'}"])
