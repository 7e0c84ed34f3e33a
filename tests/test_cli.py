"""The command line: help, config printing, the run folder, resume modes, weights-only init."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from avmoe.cli import cli_main
from tests.helpers import CONFIGS, tiny_fit_args


def run_cli(args: list[str]) -> None:
    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(args)


def test_help_shows_our_docstrings():
    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out):
        run_cli(["fit", "--help"])
    text = out.getvalue()
    assert "--run.name" in text and "Run folder name" in text
    assert "--run.resume" in text


def test_class_help_shows_config_field_docstrings():
    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out):
        run_cli(["fit", "--model.help", "avmoe.tasks.AVETask"])
    text = " ".join(out.getvalue().split())
    assert "--model.unimodal.mode" in text and "the task head with the other modality's features zeroed" in text


def test_print_config_composes_configs(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("run: {name: composed}\ntrainer: {max_epochs: 3}\n")
    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out):
        run_cli(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(extra), "--print_config"])
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["run"]["name"] == "composed"
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["model"]["class_path"] == "avmoe.tasks.AVETask"
    assert cfg["model"]["init_args"]["backbone"]["visual"]["embed_dim"] == 32


def _events(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_fit_writes_run_folder_and_resumes_in_place(ave_release, in_tmp):
    runs = in_tmp / "runs"
    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="r", epochs=1, **{"run.test_after_fit": "true"})])
    folder = runs / "r"
    assert (folder / "config.yaml").is_file()
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert (folder / "checkpoints" / "best.ckpt").is_file()
    assert _events(folder), "TensorBoard events belong in the run folder"
    test_json = json.loads((folder / "metrics" / "test.json").read_text())
    assert 0.0 <= test_json["metrics"]["test/acc"] <= 1.0
    step_1 = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step_1 > 0

    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="r", epochs=2), "--ckpt_path=last"])
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * step_1, "resumed, not restarted"
    assert not list(runs.glob("**/version_*")), "no new version folder"
    assert len(_events(folder)) >= 1


@pytest.mark.slow
def test_resume_auto_and_must(ave_release, in_tmp):
    runs = in_tmp / "runs"
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        run_cli(["fit", *tiny_fit_args(ave_release, runs, name="m", **{"run.resume": "must"})])
    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="a", **{"run.resume": "auto"})])  # fresh start
    first = torch.load(runs / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="a", epochs=2, **{"run.resume": "auto"})])
    assert torch.load(runs / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * first


@pytest.mark.slow
def test_init_from_is_weights_only_and_strict(ave_release, in_tmp):
    runs = in_tmp / "runs"
    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="src")])
    src = runs / "src" / "checkpoints" / "last.ckpt"
    run_cli(["fit", *tiny_fit_args(ave_release, runs, name="ft", **{"run.init_from": str(src)})])
    ft = torch.load(runs / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ft["epoch"] == 0, "init_from must not restore the loop state"
    with pytest.raises(RuntimeError, match="missing keys"):
        run_cli(["fit", *tiny_fit_args(ave_release, runs, name="bad", **{
            "run.init_from": str(src), "model.init_args.head.d_model": "16"})])
