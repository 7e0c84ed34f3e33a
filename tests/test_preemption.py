"""Stops the way launchers stop jobs, through the real CLI in subprocesses, compared with uninterrupted runs.

One process, 2 DataLoader workers: SIGTERM to the whole process group inside a step, then Ctrl-C (SIGINT, to
the group) during the end-of-epoch validation, then a resume whose newest checkpoint was cut short. Two DDP
processes with ``on_decode_error: skip`` and a fully skipped batch on each rank: SIGTERM to rank 1 only, then
to the group inside a step. Each sequence must end bit for bit where the uninterrupted run of the same
configuration ends: weights, optimizer, loops, callbacks and data state, ``best.ckpt``, the test metrics and
every logged scalar. Signals are sent by :class:`tests.helpers.SignalAtStep` at a chosen point (reproducible);
every wait is bounded and a job must leave no process of its group behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from avmoe.callbacks import preemption
from avmoe.callbacks.checkpointing import latest_checkpoint
from tests.helpers import REPO, tiny_fit_args
from tests.test_resume import assert_identical, load, run_cli

JOB_TIMEOUT = 240  # s; a tiny job takes ~15 s alone, more on a loaded 2-core box


def launch(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run ``python -m avmoe fit ARGS`` as the leader of a new process group; (exit code, output, seconds).

    Fails when the job outlives ``JOB_TIMEOUT`` or leaves a process of its group (worker, rank) behind.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "avmoe", "fit", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job hung (> {JOB_TIMEOUT} s): {out[-3000:]}")
    took = time.monotonic() - start
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the group is gone once its last member (worker, rank) exited
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return proc.returncode, out, took
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"processes of the job outlived it by 30 s: {out[-3000:]}")


def signal_at(step: int, name: str, when: str, to: str, rank: int | None = None) -> list[str]:
    args = ["--trainer.callbacks+=tests.helpers.SignalAtStep", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signal={name}", f"--trainer.callbacks.when={when}", f"--trainer.callbacks.to={to}"]
    return args + ([f"--trainer.callbacks.rank={rank}"] if rank is not None else [])


DIAGNOSTIC_TAGS = ("lr-", "router/", "val_router/", "epoch")


def scalars(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar in the run folder's TensorBoard event files, in the order written (a step logged again after a
    resume shows up twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3])):
        for event in EventFileLoader(str(path)).Load():
            # Scalars only (the router heat maps are images), and not the diagnostics the CLI adds (learning-rate
            # monitor, router usage, Lightning's epoch counter): across a resume those are re-logged or, under DDP,
            # cover the interrupted epoch's steps after the resume only. Every metric and loss is compared.
            out += [(v.tag, int(event.step), v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0])
                    for v in event.summary.value if (v.HasField("simple_value") or v.tensor.float_val)
                    and not v.tag.startswith(DIAGNOSTIC_TAGS)]
    return out


def metrics(folder: Path, split: str) -> dict[str, Any]:
    return json.loads((folder / "metrics" / f"{split}.json").read_text())


def assert_same_run(got: Path, want: Path) -> None:
    """Checkpoints (last, best), the test metrics and every logged scalar identical."""
    for name in ("last.ckpt", "best.ckpt"):
        assert_identical(got / "checkpoints" / name, want / "checkpoints" / name)
    assert metrics(got, "test")["metrics"] == metrics(want, "test")["metrics"]
    assert scalars(got) == scalars(want)


def loader_position(ckpt: dict[str, Any]) -> tuple[int, int]:
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    return state["epoch"], state["batches"]


# ------------------------------------------------------------------------------------------------ handlers
def test_handlers_only_record_and_a_second_ctrl_c_aborts(monkeypatch):
    """Inside a step nothing may happen but recording; the highest stop signal wins the exit code."""
    received = preemption._Received()
    monkeypatch.setattr(preemption, "_RECEIVED", received)
    preemption._on_stop_signal(signal.SIGINT, None)
    assert received.stop == signal.SIGINT, "recorded, no KeyboardInterrupt"
    preemption._on_stop_signal(signal.SIGTERM, None)
    preemption._on_stop_signal(signal.SIGTERM, None)  # repeated SIGTERM: still only recorded
    assert received.stop == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        preemption._on_stop_signal(signal.SIGINT, None)
    preemption._on_requeue_signal(signal.SIGUSR1, None)
    assert received.requeue == 1
    for agreed, code in ((0, 143), (int(signal.SIGINT), 130), (int(signal.SIGTERM), 143)):
        monkeypatch.setattr(preemption, "_AGREED_STOP", agreed)
        assert preemption.stop_exit_code() == code


def test_hpc_checkpoint_numbering(tmp_path):
    assert preemption.hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).write_bytes(b"")
    assert preemption.hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_11.ckpt"


# ------------------------------------------------------------------------------------------------ one process
# 4 samples, batch 2: 2 steps per epoch, 2 epochs; validation and test 2 batches each; the best checkpoint is
# tested at the end (test_after_fit), so an interrupted validation would show in best.ckpt and test.json.
def single_args(release: Path, runs: Path, name: str) -> list[str]:
    return tiny_fit_args(release, runs, name=name, epochs=2, **{
        "data.init_args.batch_size": 2, "data.init_args.num_workers": 2, "data.init_args.limit_samples": 4,
        "trainer.log_every_n_steps": 1, "trainer.enable_model_summary": "false", "run.test_after_fit": "true",
        "run.resume": "auto", "trainer.enable_progress_bar": "true"})


@pytest.fixture(scope="module")
def single_reference(ave_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("preempt_single_ref")
    code, out, _ = launch(single_args(ave_release, cwd / "runs", "ref"), cwd)
    assert code == 0, out[-3000:]
    return cwd / "runs" / "ref"


@pytest.mark.slow
def test_group_sigterm_and_ctrl_c_in_validation_resume_bit_for_bit(ave_release, single_reference, tmp_path):
    runs, folder = tmp_path / "runs", tmp_path / "runs" / "cut"
    ckpts = folder / "checkpoints"
    args = single_args(ave_release, runs, "cut")

    # SIGTERM to the process group (workers too) inside step 1: the step finishes, then the checkpoint, 143.
    code, out, _ = launch(args + signal_at(1, "SIGTERM", "batch_start", "group"), tmp_path)
    assert code == 143, out[-3000:]
    assert "killed by signal" not in out, "a DataLoader worker died of the SIGTERM"
    state = load(ckpts / "on_exception.ckpt")
    assert (state["global_step"], loader_position(state)) == (1, (0, 1)), "taken between steps 1 and 2"

    # Resumed inside epoch 0; Ctrl-C to the group during epoch 0's validation: it finishes first, then 130.
    code, out, took = launch(args + signal_at(2, "SIGINT", "validation", "group"), tmp_path)
    assert code == 130, out[-3000:]
    assert "Resuming cut from" in out and "on_exception.ckpt" in out
    epoch_time = float(re.search(r"epoch 0 done in ([\d.]+)s", out).group(1))
    assert epoch_time < took, f"epoch time {epoch_time} s of a {took:.0f} s job (was machine uptime)"
    state = load(ckpts / "on_exception.ckpt")
    assert (state["global_step"], state["epoch"]) == (2, 0)
    assert metrics(folder, "val")["global_step"] == 2, "the interrupted validation ran to its end"

    # The newest checkpoint cut short (killed while writing): the resume names it and uses the one before.
    newest = latest_checkpoint(folder)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    code, out, _ = launch(args, tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(rf"{re.escape(newest.name)} \(BadZipFile.*not loadable, passed over; using .*last\.ckpt", out)
    assert_same_run(folder, single_reference)
    assert [tag for tag, _, _ in scalars(folder)].count("val/acc") == 2, "every epoch's validation is logged once"


@pytest.mark.slow
def test_crash_before_the_first_step_leaves_no_checkpoint(ave_release, in_tmp):
    """A crash is not a stop between steps: nothing is written, so ``--run.resume auto`` starts fresh."""
    runs = in_tmp / "runs"
    args = tiny_fit_args(ave_release, runs, name="crash", **{
        "data.init_args.limit_samples": 4, "trainer.limit_val_batches": 1, "run.resume": "auto"})
    with pytest.raises(RuntimeError, match="injected"):
        run_cli(["fit", *args, "--trainer.callbacks+=tests.helpers.RaiseAtStep", "--trainer.callbacks.step=1"])
    assert not list((runs / "crash").rglob("*.ckpt")), "no step was taken: no checkpoint to resume"


# ------------------------------------------------------------------------------------------------ DDP
# 6 train samples, batch 1, 2 ranks: 3 steps. Epoch 0 gives rank 0 samples [0, 3, 1] and rank 1 [5, 2, 4]
# (EpochSampler, seed 0): sample 0 (rank 0, step 1) and sample 4 (rank 1, step 3) are broken, so each rank has
# a step without any usable sample while the other one trains.
BROKEN = (0, 4)


@pytest.fixture(scope="module")
def broken_release(ave_release: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    from avmoe.datamodules import AVEDataModule

    root = tmp_path_factory.mktemp("broken") / "ave"
    shutil.copytree(ave_release, root)
    dataset = AVEDataModule(str(root), num_workers=0).dataset("train")
    paths = {str(dataset.video_path(i)) for i in BROKEN}
    for path in paths:
        Path(path).write_bytes(b"\x00not an mp4\x00" * 64)
    return root, paths


def ddp_args(release: Path, runs: Path, name: str) -> list[str]:
    return tiny_fit_args(release, runs, name=name, epochs=1, **{
        "data.init_args.batch_size": 1, "data.init_args.limit_samples": 6, "data.init_args.on_decode_error": "skip",
        "data.init_args.eval_batch_size": 2, "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 1,
        "trainer.enable_model_summary": "false", "run.test_after_fit": "true", "run.resume": "auto",
        "trainer.strategy": "ddp", "trainer.devices": 2, "trainer.accelerator": "cpu"})


@pytest.fixture(scope="module")
def ddp_reference(broken_release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("preempt_ddp_ref")
    code, out, _ = launch(ddp_args(broken_release[0], cwd / "runs", "ref"), cwd)
    assert code == 0, out[-3000:]
    return cwd / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_skips_are_gathered_and_sigterm_to_one_rank_or_the_group_stops_all_ranks_alike(broken_release,
                                                                                            ddp_reference, tmp_path):
    """One test (the reference run is shared, also across pytest-xdist workers): the uninterrupted run names
    the clips skipped on both ranks and does not hang on the steps without a usable sample; then the stops."""
    _, broken = broken_release
    for split in ("val", "test"):
        report = metrics(ddp_reference, split)
        assert set(report["skipped_clips"]) == broken, "the clips skipped on both ranks are named"
        assert report["num_skipped"] == len(BROKEN), "one epoch: each broken clip skipped once"
    assert load(ddp_reference / "checkpoints" / "last.ckpt")["global_step"] == 3, "every rank ran every step"

    runs, folder = tmp_path / "runs", tmp_path / "runs" / "cut"
    args = ddp_args(broken_release[0], runs, "cut")

    # SIGTERM to rank 1 only, after step 1 (rank 0 knows nothing of it): both ranks stop after step 2 at the
    # latest (the flag is all-reduced at every step boundary), one checkpoint, exit 143 within seconds.
    code, out, _ = launch(args + signal_at(1, "SIGTERM", "batch_end", "self", rank=1), tmp_path)
    assert code == 143, out[-3000:]
    state = load(folder / "checkpoints" / "on_exception.ckpt")
    assert state["global_step"] == 1 and loader_position(state) == (0, 1)

    # SIGTERM to the group from inside rank 0's step 2: rank 1 gets it wherever it is in its own step 2.
    code, out, _ = launch(args + signal_at(2, "SIGTERM", "batch_start", "group", rank=0), tmp_path)
    assert code == 143, out[-3000:]
    assert "Connection reset" not in out
    state = load(folder / "checkpoints" / "on_exception.ckpt")
    assert state["global_step"] == 2 and loader_position(state) == (0, 2)

    code, out, _ = launch(args, tmp_path)
    assert code == 0, out[-3000:]
    assert_same_run(folder, ddp_reference)
    assert metrics(folder, "test")["num_skipped"] == metrics(ddp_reference, "test")["num_skipped"]
