"""The run folder through the real CLI (subprocesses): records never overwritten, flags that win over a
checkpoint, refusing to clobber a run, one-line user errors, and what users look at (router usage, parameters,
CSV, learning rate). One fit is shared by every assertion (module-scoped fixture)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import finish_cli, start_cli, tiny_fit_args

# Every test of this module on one xdist worker (`--dist loadgroup`): they share one fit.
pytestmark = pytest.mark.xdist_group("cli_run_folder")
LIMITS = {"trainer.limit_train_batches": 2, "trainer.limit_val_batches": 2, "trainer.limit_test_batches": 2}


start, finish = start_cli, finish_cli


def avmoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return finish(start(*args, cwd=cwd))


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_xdist_groups_reach_the_scheduler(request) -> None:
    # Under `--dist loadgroup` pytest-xdist marks a grouped test by an "@group" suffix of its node id, the only
    # thing its scheduler reads; pytest 9.2 dropped that silently (pytest-dev/pytest-xdist#1386) and this module's
    # fit then ran once per worker.
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not running under `pytest -n N --dist loadgroup`")
    assert request.node.nodeid.endswith("@cli_run_folder"), request.node.nodeid


@pytest.fixture(scope="module")
def fitted(ave_release, tmp_path_factory) -> dict[str, Any]:
    """A 1-epoch fit with test_after_fit, SGD through --optimizer (2 train batches)."""
    work = tmp_path_factory.mktemp("cli_run")
    runs = work / "runs"
    fit_args = tiny_fit_args(ave_release, runs, name="r", **{"run.test_after_fit": "true", **LIMITS})
    proc = _ok(avmoe("fit", *fit_args, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.0123",
                     "--optimizer.momentum=0.5", cwd=work))
    folder = runs / "r"
    return {"work": work, "runs": runs, "folder": folder, "fit_args": fit_args, "proc": proc,
            "config": (folder / "config.yaml").read_bytes(), "best": folder / "checkpoints" / "best.ckpt"}


@pytest.fixture(scope="module")
def after_fit(fitted, ave_release) -> dict[str, Any]:
    """The commands run on the fitted run folder, concurrently (each is mostly start-up):

    - ``test --ckpt_path best`` with an eval switch in a second config file and a flag;
    - ``test`` with a moved (here: missing) weights folder;
    - ``fit`` again without resume;
    - ``predict`` on a folder of "own" videos (copies of three release clips under other names).
    """
    work, folder = fitted["work"], fitted["folder"]
    extra = work / "eval.yaml"
    extra.write_text("model:\n  init_args:\n    unimodal: {eval_correctness: false}\n")
    mine = work / "my videos"
    mine.mkdir()
    for i, src in enumerate(sorted((ave_release / "AVE").glob("*.mp4"))[:3]):
        (mine / f"holiday_{i}.mp4").write_bytes(src.read_bytes())
    (mine / "notes.txt").write_text("not a video")
    base = [a for a in fitted["fit_args"] if "test_after_fit" not in a and "max_epochs" not in a]
    best = f"--ckpt_path={fitted['best']}"
    last_mtime = (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    procs = {
        "test": start("test", *base, "--config", str(extra), best, "--model.init_args.head.dropout=0.5", cwd=work),
        "moved": start("test", *base, best, f"--model.init_args.backbone.visual.pretrained={work / 'moved'}",
                       cwd=work),
        "refit": start("fit", *fitted["fit_args"], cwd=work),
        "predict": start("predict", *[a for a in base if "data.init_args.root" not in a], best,
                         "--data.init_args.root=/nowhere", f"--data.init_args.predict_dir={mine}", cwd=work),
    }
    done = {name: finish(proc) for name, proc in procs.items()}
    _ok(done["test"])
    return {**done, "metrics": _json(folder / "metrics" / "test_test.json"), "last_mtime": last_mtime,
            "moved_path": work / "moved"}


@pytest.mark.slow
def test_user_config_and_flags_win_over_checkpoint_hparams(fitted, after_fit):
    tested = after_fit
    out = tested["test"].stdout + tested["test"].stderr
    assert "model.init_args.unimodal.eval_correctness: True (checkpoint) -> False" in out
    assert "model.init_args.head.dropout: 0.1 (checkpoint) -> 0.5" in out
    metrics = tested["metrics"]["metrics"]
    assert "test/acc" in metrics
    assert "test/unimodal_audio" not in metrics, "the eval switch from the config file was discarded"
    assert "test/unimodal_audio" in _json(fitted["folder"] / "metrics" / "test.json")["metrics"]


@pytest.mark.slow
def test_moved_weights_folder_is_used_and_missing_one_is_one_clear_line(after_fit):
    """``--...visual.pretrained NEWPATH`` reaches the model (the checkpoint said None); a missing folder says so."""
    proc = after_fit["moved"]
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert f"backbone.visual.pretrained: folder '{after_fit['moved_path']}' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "Repo id" not in proc.stderr
    assert "AVMOE_DEBUG=1" in proc.stderr


@pytest.mark.slow
def test_evaluation_never_overwrites_the_fit_record(fitted, after_fit):
    tested = after_fit
    folder = fitted["folder"]
    assert (folder / "config.yaml").read_bytes() == fitted["config"], "test replaced the fit's config.yaml"
    assert "ckpt_path:" in (folder / "config.test.yaml").read_text()
    best = torch.load(fitted["best"], map_location="cpu", weights_only=True, mmap=True)
    record = tested["metrics"]
    assert record["checkpoint"] == str(fitted["best"].resolve())
    assert (record["epoch"], record["global_step"]) == (best["epoch"], best["global_step"]) != (0, 0)
    after_fit = _json(folder / "metrics" / "test.json")  # run.test_after_fit: the best checkpoint's position
    assert after_fit["checkpoint"] == str(fitted["best"].resolve())
    assert (after_fit["epoch"], after_fit["global_step"]) == (best["epoch"], best["global_step"])
    assert _json(folder / "metrics" / "val.json")["subcommand"] == "fit"


@pytest.mark.slow
def test_rerunning_an_existing_run_refuses_and_names_the_choices(fitted, after_fit):
    proc = after_fit["refit"]
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    err = proc.stderr
    assert "already holds a run" in err and "--run.resume auto" in err and "--run.name" in err
    assert "--run.overwrite true" in err and "Traceback" not in err
    assert (fitted["folder"] / "checkpoints" / "last.ckpt").stat().st_mtime_ns == after_fit["last_mtime"]


@pytest.mark.slow
def test_optimizer_flag_replaces_the_default_and_lr_is_logged(fitted):
    ckpt = torch.load(fitted["folder"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.0123) and group["momentum"] == 0.5 and "betas" not in group
    header = (fitted["folder"] / "metrics.csv").read_text().splitlines()[0].split(",")  # fit's, kept by test
    assert "lr-SGD" in header and "val/acc" in header and "router/0.0.a1/e0_weight" in header


@pytest.mark.slow
def test_checkpoint_monitor_is_in_the_saved_config(fitted):
    import yaml

    cfg = yaml.safe_load(fitted["config"])
    assert cfg["checkpoint"]["monitor"] == "val/acc" and cfg["checkpoint"]["mode"] == "max"
    assert cfg["checkpoint"]["dirpath"] == str(fitted["folder"] / "checkpoints")
    assert cfg["run"]["router_usage"] is True and cfg["optimizer"]["class_path"] == "torch.optim.SGD"


@pytest.mark.slow
def test_parameter_breakdown_replaces_the_flops_summary_and_benign_warnings_are_filtered(fitted):
    out = fitted["proc"].stdout + fitted["proc"].stderr
    assert "Parameters of AVETask" in out and "FLOPs" not in out
    for benign in ("LeafSpec", "litlogger", "in eval mode at the start of training", "exists and is not empty"):
        assert benign not in out, benign
    parts = _json(fitted["folder"] / "parameters.json")
    assert parts["visual encoder"]["trainable"] == 0 and parts["visual encoder"]["frozen"] > 0
    assert parts["MoE adapters"]["trainable"] > 0 and parts["head"]["trainable"] > 0
    assert parts["total"]["trainable"] == sum(p["trainable"] for k, p in parts.items() if k != "total")


@pytest.mark.slow
def test_router_usage_json_and_tensorboard_heat_map(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    usage = _json(fitted["folder"] / "router_usage" / "train.json")
    assert usage["experts"] == ["cross0", "uni0"] and len(usage["modules"]) == 16  # 2 stages x 2 positions x 4
    epoch = usage["epochs"][-1]
    for kind in ("weight", "top1"):
        rows = torch.tensor(epoch[kind])
        assert rows.shape == (16, 2) and torch.allclose(rows.sum(1), torch.ones(16), atol=1e-3)
    assert (fitted["folder"] / "router_usage" / "val.json").is_file()
    events = EventAccumulator(str(fitted["folder"]), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "router/train_weight" in events.Tags()["images"]
    assert "router/0.0.a1/e0_weight" in events.Tags()["scalars"]


@pytest.mark.slow
def test_per_class_results_in_the_metrics_json(fitted, after_fit):
    tested = after_fit
    for record in (_json(fitted["folder"] / "metrics" / "test.json"), tested["metrics"]):
        per_class = record["details"]["per_class_acc"]
        assert "background" in per_class and all(0.0 <= v <= 1.0 for v in per_class.values())
        assert set(per_class) <= {*__import__("avmoe.datamodules.ave", fromlist=["x"]).AVE_CATEGORIES, "background"}


@pytest.mark.slow
def test_predict_on_a_folder_of_own_videos(fitted, after_fit):
    """``--data.init_args.predict_dir``: every mp4 of a folder, no release root needed, scores per file."""
    proc = _ok(after_fit["predict"])
    path = fitted["folder"] / "predictions" / "ave_predictions.json"
    assert f"3 predictions written to {path}" in proc.stdout + proc.stderr
    payload = _json(path)
    assert payload["checkpoint"] == str(fitted["best"].resolve())
    records = payload["predictions"]
    assert [r["video_id"] for r in records] == ["holiday_0", "holiday_1", "holiday_2"]
    for r in records:
        assert len(r["segments"]) == len(r["segment_event_prob"]) == 10 and 0.0 <= r["event_score"] <= 1.0
        assert all((p > 0.5) == (s != "background") for p, s in zip(r["segment_event_prob"], r["segments"])
                   if abs(p - 0.5) > 1e-3)
    assert (fitted["folder"] / "config.predict.yaml").is_file()


def test_print_config_shows_the_resolved_checkpoint_monitor(tmp_path):
    """``--print_config`` shows the ``checkpoint`` section config.yaml will hold (the task's monitor and mode, the
    run folder's dirpath), and a flag still wins. Parsing only: nothing trains."""
    import io
    from contextlib import redirect_stdout
    from unittest import mock

    import yaml

    from avmoe.cli import cli_main
    from tests.helpers import CONFIGS

    proc = _ok(avmoe("fit", "--config", str(CONFIGS / "demo_avs.yaml"), "--run.root=elsewhere", "--print_config",
                     cwd=tmp_path))
    printed = yaml.safe_load(proc.stdout)["checkpoint"]
    assert printed["monitor"] == "val/mj" and printed["mode"] == "max"
    assert printed["dirpath"] == str(Path("elsewhere") / "demo_avs" / "checkpoints")
    assert printed["filename"] == "best"
    out = io.StringIO()  # the override, in-process (the same parser; a second subprocess start-up costs ~6 s)
    with pytest.raises(SystemExit), redirect_stdout(out), mock.patch("sys.argv", ["lightning"]):
        cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--checkpoint.monitor=val/loss",
                  "--checkpoint.mode=min", "--print_config"])
    printed = yaml.safe_load(out.getvalue())["checkpoint"]
    assert printed["monitor"] == "val/loss" and printed["mode"] == "min"


# ------------------------------------------------------------------------------------------ in-process, cheap
def _help(*args: str) -> str:
    import io
    from contextlib import redirect_stdout
    from unittest import mock

    from avmoe.cli import cli_main

    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out), mock.patch("sys.argv", ["lightning"]):
        cli_main(list(args))
    return out.getvalue()


def test_top_level_help_names_avmoe_and_its_subcommands():
    text = " ".join(_help("--help").split())
    assert text.startswith("usage: lightning") and "avmoe: AVMoE audio-visual learning" in text
    for sub in ("fit", "validate", "test", "predict", "select"):
        assert sub in text
    assert "AVMOE_DEBUG=1" in text


@pytest.mark.parametrize("task", ["AVETask", "AVVPTask", "AVSTask", "AVQATask"])
def test_every_model_option_has_a_description(task):
    import re

    options: dict[str, str] = {}
    current = None
    for line in _help("fit", "--model.help", f"avmoe.tasks.{task}").splitlines():
        match = re.match(r"^\s+(--model\.\S+)(.*)$", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2)
        elif current and not re.match(r"^\s+ENV:", line):
            options[current] += " " + line
    assert len(options) > 30
    undocumented = [name for name, text in options.items()
                    if not re.sub(r"\((type|default): [^)]*\)|\{[^}]*\}|\S+_?[A-Z]+\b", "", text).strip()]
    assert not undocumented, undocumented


def test_missing_avqa_root_says_the_root_is_missing(tmp_path):
    from avmoe.datamodules.musicavqa import MusicAVQADataModule

    dm = MusicAVQADataModule(root=str(tmp_path / "no_avqa"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"MUSIC-AVQA root .*no_avqa does not exist"):
        dm.vocab


def test_user_errors_are_one_line_and_bugs_keep_their_traceback():
    from avmoe.errors import user_error_message

    wrapped = ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
                         "  - Expected a <class 'NoneType'>\n  - data.batch_size must be a positive integer, got 0\n"
                         "Given value type: <class 'jsonargparse._namespace.Namespace'>")
    assert user_error_message(wrapped) == "data.batch_size must be a positive integer, got 0"
    assert user_error_message(FileNotFoundError("--ckpt_path x.ckpt: no such checkpoint file")).startswith("--ckpt")
    assert user_error_message(RuntimeError("shape mismatch in the head")) is None
    from avmoe.datamodules.ave import AVEDataModule

    with pytest.raises(ValueError, match="data.batch_size must be a positive integer, got 0"):
        AVEDataModule(root="x", batch_size=0)


def test_llp_predict_dir_decodes_own_videos_like_the_release(llp_release, tmp_path):
    """The AVVP side of ``predict_dir``: the folder's files, decoded exactly as the release's clips."""
    import shutil

    from avmoe.datamodules.llp import VIDEO_DIR, LLPDataModule

    mine = tmp_path / "mine"
    mine.mkdir()
    dm = LLPDataModule(root=str(llp_release), num_workers=0, image_size=32, predict_dir=str(mine))
    release = dm.dataset("test")
    assert release.video_path(0).parent == llp_release / VIDEO_DIR
    shutil.copy(release.video_path(0), mine / "street.mp4")
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["video_id"] == ["street"] and batch["filename"] == ["street"]
    reference = release[0]
    assert torch.equal(batch["video"][0], reference["video"]) and torch.equal(batch["audio"][0], reference["audio"])
    with pytest.raises(FileNotFoundError, match="no .mp4 file"):
        LLPDataModule(root=str(llp_release), predict_dir=str(tmp_path)).build_folder_dataset(str(tmp_path))


def test_per_class_details_of_every_metric():
    from avmoe.metrics.ave import AVESegmentAccuracy
    from avmoe.metrics.avqa import AVQAAccuracy
    from avmoe.metrics.avs import AVSMetric, frame_iou

    ave = AVESegmentAccuracy(num_classes=3)
    ave.update(torch.arange(2), torch.tensor([[0, 1, 2], [2, 2, 1]]), torch.tensor([[0, 1, 1], [2, 1, 1]]))
    assert ave.details() == {"per_class_acc": {0: 1.0, 1: 0.5, 2: 1.0}}  # class 1: 2 of 4 segments
    avqa = AVQAAccuracy()
    avqa.update(torch.arange(4), torch.tensor([1, 0, 2, 2]), torch.tensor([1, 1, 2, 0]), torch.zeros(4))
    assert avqa.details() == {"per_answer_acc": {0: 0.0, 1: 0.5, 2: 1.0}}
    avs = AVSMetric(num_thresholds=10)
    logits, target = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.5).float()
    avs.update(torch.arange(3), logits, target, torch.ones(3, 2, dtype=torch.bool), torch.tensor([5, 5, 7]))
    iou = frame_iou(logits.flatten(0, 1), target.flatten(0, 1)).view(3, 2)
    details = avs.details()
    assert details["per_category_mj"][5] == pytest.approx(float(iou[:2].mean()))
    assert details["per_category_mj"][7] == pytest.approx(float(iou[2].mean()))
    assert set(details["per_category_mf"]) == {5, 7}
