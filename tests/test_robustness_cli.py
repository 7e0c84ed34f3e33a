"""The robustness sweep through the CLI on a synthetic release of every task: ``test`` with a sweep config ->
``metrics/robustness.json`` and the TensorBoard curves.

The model is the demo config's tiny model as initialised (seeded), except for AVS: its TPAVI blocks start with a
zero output projection (as the official AVSBench code), so an untrained AVS model ignores the audio; one fit step
at 10x the demo learning rate (0.02) makes it listen, and that checkpoint is tested with ``--ckpt_path``. (At the demo's
2e-3 the step moves the audio's effect on the test loss to ~1e-6, where float rounding decides whether a
corruption shows; a fit per task would double this test.)"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import CONFIGS, TASK_CASES, task_config_problem, task_fit_args

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# Every kind once, at a strong level: missing audio (the paper's visual-only), waveform noise (in the loaders),
# a pixel corruption and an attack (gradients inside the test loop; 1 PGD step keeps the test short).
SWEEP = {"robustness": {"sweep": [
    {"name": "visual_only", "setting": {"missing": "audio"}},
    {"name": "audio_white_noise", "setting": {"audio_corruption": "white_noise"}, "vary": "severity", "values": [5]},
    {"name": "visual_occlusion", "setting": {"visual_corruption": "occlusion"}, "vary": "severity", "values": [5]},
    {"name": "pgd_audio", "setting": {"attack": "pgd_l2", "attack_eps_audio": 1.0, "attack_steps": 1},
     "vary": "attack_eps_audio", "values": [200.0]},
]}}


def _run(args: list[str]) -> None:
    from avmoe.cli import cli_main

    cli_main(args)


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_sweep_through_the_cli_writes_the_table_and_the_figure(task, request, tmp_path):
    problem = task_config_problem(task)
    if problem:
        pytest.skip(problem)
    release = request.getfixturevalue(TASK_CASES[task][1])
    runs = tmp_path / "runs"
    common = {"trainer.limit_test_batches": 1}
    ckpt_args = []
    if task == "avs":
        _run(["fit", *task_fit_args(task, release, runs, name=task, **common,
                                    **{"trainer.max_steps": 1, "trainer.limit_val_batches": 0,
                                       "model.init_args.optim.lr": 0.02})])
        ckpt_args = ["--ckpt_path", str(runs / task / "checkpoints" / "last.ckpt")]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    args = [a for a in task_fit_args(task, release, runs, name=task, **common) if not a.startswith("--trainer.max_")]
    if task == "avqa":  # the waveform noise needs on-the-fly decoding (the clip cache stores log-mels)
        args = [a for a in args if not a.startswith("--data.init_args.cache_dir")] + ["--data.init_args.cache_dir=null"]
    _run(["test", *args, "--config", str(sweep), *ckpt_args])

    metrics = runs / task / "metrics"
    table = json.loads((metrics / "robustness.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["clean", "visual_only", "audio_white_noise", "visual_occlusion", "pgd_audio"]
    clean = json.loads((metrics / "test_test.json").read_text())["metrics"]
    assert rows["clean"]["metrics"] == pytest.approx(clean)  # test.json stays the clean test
    assert rows["visual_only"]["setting"] == {"missing": "audio", "missing_fill": "raw"}  # the fill is recorded
    assert rows["audio_white_noise"]["setting"]["snr_db"] == 0.0
    for name in ("visual_only", "audio_white_noise", "visual_occlusion", "pgd_audio"):
        row = rows[name]
        assert set(row["metrics"]) == set(clean)
        assert row["metrics"]["test/loss"] != clean["test/loss"], name  # the condition reached the model
        key = next(k for k in clean if k != "test/loss")
        if clean[key]:
            assert row["relative_drop"][key] == pytest.approx((clean[key] - row["metrics"][key]) / clean[key])
    assert rows["pgd_audio"]["metrics"]["test/loss"] > clean["test/loss"]  # the attack raised the task loss
    assert "visual_only" in table["series_mean"]

    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(runs / task / "robustness"))
    events.Reload()
    tags = {t for run in events.Runs() for t in events.Runs()[run].get("scalars", [])}
    metric = next(k for k in clean if k != "test/loss").removeprefix("test/")
    assert f"robustness/{metric}/pgd_audio" in tags and f"robustness/{metric}/visual_only" in tags


def test_validate_with_a_preset_records_the_setting(ave_release, tmp_path):
    """``validate`` honours a preset config (here the paper's missing audio) and records it next to the metrics."""
    runs = tmp_path / "runs"
    args = [a for a in task_fit_args("ave", ave_release, runs, name="v", **{"trainer.limit_val_batches": 1})
            if not a.startswith(("--trainer.max_", "--run.test_after_fit"))]
    _run(["validate", *args])
    clean = json.loads((runs / "v" / "metrics" / "validate_val.json").read_text())["metrics"]
    preset = str(CONFIGS / "robustness" / "missing_audio.yaml")
    _run(["validate", *args, "--config", preset])
    missing = json.loads((runs / "v" / "metrics" / "validate_val.json").read_text())["metrics"]
    recorded = json.loads((runs / "v" / "metrics" / "robustness_setting.json").read_text())
    assert recorded["stage"] == "validate" and recorded["setting"]["missing"] == "audio"
    assert recorded["setting"]["missing_fill"] == "raw"
    assert missing["val/loss"] != clean["val/loss"]
