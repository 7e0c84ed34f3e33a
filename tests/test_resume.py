"""Exact resume: the sampler/loader state, and fit N == fit k + resume to N, bit for bit, for every task.

Unit tests (fast) pin the pieces: the train order is a function of (seed, epoch), a loader with prefetching
workers counts the batches the loop received, a restored loader continues at the next batch, item randomness
does not depend on workers. The end-to-end tests (slow) run the real CLI in-process on each task's demo config
with a balancing callback and compare the final checkpoints of an uninterrupted run and of interrupted ones
(epoch boundary; every-n-steps checkpoint inside an epoch; SIGTERM inside an epoch; SLURM's requeue signal).
"""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch.utils.data import Dataset

from avmoe.callbacks.checkpointing import latest_checkpoint
from avmoe.cli import SIGTERM_EXIT_CODE, cli_main
from avmoe.datamodules.sampling import EpochSampler, ResumableDataLoader, SeededItems
from tests.helpers import CONFIGS, TASK_CASES, task_config_problem, task_fit_args


class Noisy(Dataset):
    """Item i -> (i, a torch draw, a numpy draw): shows which random numbers loading an item consumed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np

        return {"index": torch.tensor(i), "t": torch.rand(()), "n": torch.tensor(np.random.rand())}


def _loader(n: int = 11, batch_size: int = 2, workers: int = 0, world: int = 1, rank: int = 0,
            seed: int = 3) -> ResumableDataLoader:
    ds = Noisy(n)
    sampler = EpochSampler(ds, num_replicas=world, rank=rank, seed=seed)
    return ResumableDataLoader(SeededItems(ds, seed), batch_size=batch_size, sampler=sampler,
                               num_workers=workers, generator=torch.Generator(), persistent_workers=workers > 0)


def _rows(batches: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    return [(int(i), float(t), float(n)) for b in batches for i, t, n in zip(b["index"], b["t"], b["n"])]


def test_train_order_is_a_function_of_seed_and_epoch_and_shards_cover_the_epoch():
    a, b = _loader(), _loader()
    a.sampler.set_epoch(1)
    b.sampler.set_epoch(1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(a.sampler) == list(b.sampler)
    b.sampler.set_epoch(2)
    assert [i for _, i in a.sampler] != [i for _, i in b.sampler]
    shards = [EpochSampler(range(11), num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in shards:
        s.set_epoch(1)
    got = [i for s in shards for _, i in s]
    assert len(got) == 12 and set(got) == set(range(11)), "padded by one repeat, every sample present"
    assert [i for _, i in shards[0]] == shards[0].order()[0::2]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_consumed_batches_and_resumes_at_the_next_one(workers):
    full = _loader(workers=workers)
    full.sampler.set_epoch(4)
    reference = _rows(list(full))

    loader = _loader(workers=workers)
    loader.sampler.set_epoch(4)
    it = iter(loader)
    head = [next(it), next(it)]  # workers have prefetched more than this by now
    state = loader.state_dict()
    assert state["epoch"] == 4 and state["batches"] == 2, state
    del it

    resumed = _loader(workers=workers)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(4)  # Lightning sets the epoch after iter(); the iterator starts lazily
    it = iter(resumed)
    tail = list(it)
    assert _rows(head) + _rows(tail) == reference, "continues at the next batch with the same item randomness"
    assert resumed.state_dict()["batches"] == len(resumed) == 6


def test_restored_state_of_an_earlier_epoch_does_not_skip_the_next_epoch():
    loader = _loader()
    loader.load_state_dict({**_loader().state_dict(), "epoch": 0, "batches": 6})  # saved at epoch 0's end
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 6


def test_changed_loader_warns_and_restarts_the_epoch():
    state = {**_loader().state_dict(), "batches": 2}
    other = _loader(batch_size=3)
    with pytest.warns(UserWarning, match="differs"):
        other.load_state_dict(state)
    assert len(list(other)) == len(other)


def test_item_randomness_is_independent_of_workers_and_leaves_global_rngs_alone():
    one, two = _loader(workers=0), _loader(workers=2)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    rows = _rows(list(one))
    after = torch.rand(3)
    assert torch.equal(before, after), "loading in the main process must not consume the global generator"
    assert rows == _rows(list(two))


def test_latest_checkpoint_is_the_newest_of_last_exception_and_requeue(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    assert latest_checkpoint(folder) is None
    ckpts = folder / "checkpoints"
    files = [ckpts / "last.ckpt", folder / "hpc_ckpt_2.ckpt", ckpts / "on_exception.ckpt"]
    for i, path in enumerate(files):
        torch.save({"global_step": i}, path)
        os.utime(path, ns=(10**18 + i, 10**18 + i))
        assert latest_checkpoint(folder) == path
    os.utime(files[0], ns=(10**18 + 9, 10**18 + 9))
    assert latest_checkpoint(folder) == files[0]
    torch.save({}, folder / "checkpoints" / "best.ckpt")  # never a resume candidate
    assert latest_checkpoint(folder) == files[0]
    # The newest cut short (killed while writing, disk full): passed over, naming it and the one used instead.
    files[0].write_bytes(files[0].read_bytes()[:-30])
    with pytest.warns(UserWarning, match=r"last\.ckpt \(BadZipFile.*not loadable, passed over; using .*on_exception"):
        assert latest_checkpoint(folder) == files[2]


# ------------------------------------------------------------------------------------------------ end to end
def run_cli(args: list[str]) -> int:
    """Run the CLI in-process; return its exit code (0, or 143 after SIGTERM)."""
    with mock.patch("sys.argv", ["avmoe"]):
        try:
            cli_main(args)
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where two checkpoint trees differ (tensors bit for bit; run-folder paths normalised by the caller)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k} (only in one)" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} != {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def comparable(ckpt: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What must be identical after an exact resume: weights, optimizer, schedulers, loops, callbacks, data."""
    def normalise(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(str(folder), "<run>")
        if isinstance(value, dict):
            return {normalise(k): normalise(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(normalise(v) for v in value)
        return value

    keys = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")
    out = {k: normalise(ckpt.get(k)) for k in keys}
    out["datamodule"] = {k: v for k, v in ckpt.items() if "DataModule" in k}
    return out


BEST_TRACKING = ("best_k_models", "kth_value", "best_model_score", "kth_best_model_path", "best_model_path")


def assert_identical(got: Path, want: Path, other_folder: bool = False) -> None:
    """``other_folder``: ``got`` was resumed from a checkpoint of another run folder. Lightning's ModelCheckpoint
    then restores its best-k tracking only when the dirpath is the same (``ModelCheckpoint.load_state_dict``), so
    that tracking is left out of the comparison; weights, optimizer, loops and every other callback still count."""
    a, b = comparable(load(got), got.parents[1]), comparable(load(want), want.parents[1])
    if other_folder:
        for tree in (a, b):
            tree["callbacks"] = {k: ({kk: vv for kk, vv in v.items() if kk not in BEST_TRACKING}
                                     if k.startswith("ModelCheckpoint") else v) for k, v in tree["callbacks"].items()}
    # Checkpoint callbacks that only one run had (every-n-steps) are not state of the training itself; every
    # other callback (the balancing ones) must be there in both. ModelCheckpoint.current_score is a transient
    # of its latest save that Lightning does not restore (not part of its load_state_dict).
    only = set(a["callbacks"]) ^ set(b["callbacks"])
    assert all("Checkpoint" in key for key in only), only
    for tree in (a, b):
        tree["callbacks"] = {k: {kk: vv for kk, vv in v.items() if kk != "current_score"}
                             for k, v in tree["callbacks"].items() if k not in only}
    diff = differences(a, b)
    assert not diff, f"{got} differs from {want} at: {diff[:15]}"


# AVE: two epochs of two batches (steps 1-4); step 3 = epoch 1, batch 0: mid-epoch with epoch > 0, so the
# sampler's epoch must be restored too. The other tasks (to keep the suite short): one epoch of two batches,
# interrupted after step 1. The tiny demo models have dropout: exactness needs StepSeeding as well.
BATCHES = 2
PLAN = {"ave": (2, 3)}  # task -> (epochs, step after which to interrupt)
DEFAULT_PLAN = (1, 1)
_REFERENCES: dict[str, Path] = {}


def _task_args(task: str, releases: dict[str, Path], runs: Path, name: str, epochs: int | None = None,
               **kw: object) -> list[str]:
    epochs = PLAN.get(task, DEFAULT_PLAN)[0] if epochs is None else epochs
    args = task_fit_args(task, releases[task], runs, name=name, epochs=epochs, **{
        "trainer.limit_train_batches": BATCHES, "trainer.limit_val_batches": 1,
        "data.init_args.limit_samples": 2 * BATCHES + 1, **kw})
    callbacks = CONFIGS / "callbacks" / "ogm_ge.yaml"  # a balancing callback with state of its own
    return args + (["--config", str(callbacks)] if callbacks.is_file() else [])


def _signal(step: int, name: str = "SIGTERM") -> list[str]:
    return ["--trainer.callbacks+=tests.helpers.SignalAtStep", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signal={name}"]


def reference(task: str, releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of the uninterrupted run of ``task`` (run once per session)."""
    if task not in _REFERENCES:
        runs = tmp_path_factory.mktemp(f"reference_{task}")
        assert run_cli(["fit", *_task_args(task, releases, runs, "ref")]) == 0
        _REFERENCES[task] = runs / "ref" / "checkpoints" / "last.ckpt"
        assert load(_REFERENCES[task])["global_step"] == PLAN.get(task, DEFAULT_PLAN)[0] * BATCHES
    return _REFERENCES[task]


@pytest.fixture
def releases(request) -> dict[str, Path]:
    callspec = getattr(request.node, "callspec", None)
    task = callspec.params.get("task", "ave") if callspec else "ave"
    problem = task_config_problem(task)
    if problem:
        pytest.skip(problem)
    return {task: request.getfixturevalue(TASK_CASES[task][1])}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_CASES))
def test_mid_epoch_checkpoints_resume_at_the_next_batch_bit_for_bit(task, releases, in_tmp, tmp_path_factory):
    """SIGTERM and an every-n-steps checkpoint inside an epoch both resume at the next batch, exactly."""
    want = reference(task, releases, tmp_path_factory)
    epochs, mid = PLAN.get(task, DEFAULT_PLAN)
    runs = in_tmp / "runs"
    # AVE also with two prefetching workers: the loader must count batches the loop got, not indices produced
    # (the reference ran without workers: item randomness does not depend on them).
    workers = {"data.init_args.num_workers": 2} if task == "ave" else {}
    cut = _task_args(task, releases, runs, "cut", **{"run.checkpoint_every_n_steps": mid, **workers})
    assert run_cli(["fit", *cut, *_signal(mid)]) == SIGTERM_EXIT_CODE
    ckpts = runs / "cut" / "checkpoints"
    state = load(ckpts / "on_exception.ckpt")
    epoch, batch = divmod(mid, BATCHES)
    assert (state["global_step"], state["epoch"]) == (mid, epoch)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches"]) == (epoch, batch), "the checkpoint has the position"
    assert load(ckpts / "last.ckpt")["global_step"] == mid, "every-n-steps checkpoint inside the epoch"
    assert latest_checkpoint(runs / "cut") == ckpts / "on_exception.ckpt"
    step_ckpt = shutil.copy(ckpts / "last.ckpt", in_tmp / "step.ckpt")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run_cli(["fit", *cut, "--ckpt_path=last"]) == 0
    assert not [w for w in record if "not resumable" in str(w.message)], "Lightning sees a resumable loader"
    assert_identical(ckpts / "last.ckpt", want)

    if task == "ave":  # the every-n-steps checkpoint, given as a file (its hyper-parameters are merged too)
        resumed = _task_args(task, releases, runs, "from_step", **workers)
        assert run_cli(["fit", *resumed, f"--ckpt_path={step_ckpt}"]) == 0
        assert_identical(runs / "from_step" / "checkpoints" / "last.ckpt", want, other_folder=True)


REQUEUE = ('{"class_path": "lightning.fabric.plugins.environments.SLURMEnvironment", '
           '"init_args": {"auto_requeue": true}}')


@pytest.mark.slow
def test_slurm_requeue_and_epoch_boundary_resume_bit_for_bit(releases, in_tmp, monkeypatch, tmp_path_factory):
    """A SLURM job's life, on AVE: SLURMEnvironment(auto_requeue=True) on SIGUSR1 (``--signal=SIGUSR1@90``)
    writes hpc_ckpt_1.ckpt and calls ``scontrol requeue <job>``; the job ends at epoch 1; the next one resumes
    there (``run.resume=auto``), SLURM's SIGTERM stops it inside epoch 2 with exit code 143; the last one resumes
    from the newest checkpoint. The result equals the uninterrupted 2-epoch run, bit for bit."""
    want = reference("ave", releases, tmp_path_factory)
    bin_dir = in_tmp / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in that records its arguments
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {in_tmp / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "avmoe",
                       "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    runs, folder = in_tmp / "runs", in_tmp / "runs" / "slurm"

    def job(epochs: int, *extra: str) -> int:
        args = _task_args("ave", releases, runs, "slurm", epochs=epochs, **{"run.resume": "auto"})
        return run_cli(["fit", *args, f"--trainer.plugins={REQUEUE}", *extra])

    assert job(1, *_signal(1, "SIGUSR1")) == 0
    assert (in_tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert load(folder / "hpc_ckpt_1.ckpt")["global_step"] == 1
    assert latest_checkpoint(folder) == folder / "checkpoints" / "last.ckpt"  # epoch end, newer than the hpc one
    assert job(2, *_signal(3)) == SIGTERM_EXIT_CODE
    assert latest_checkpoint(folder) == folder / "checkpoints" / "on_exception.ckpt"
    assert job(2) == 0
    assert_identical(folder / "checkpoints" / "last.ckpt", want)


@pytest.mark.slow
def test_no_silent_restart_and_no_silent_resume(ave_release, in_tmp):
    """``--ckpt_path last`` without a checkpoint fails (stock Lightning trains from scratch); ``run.resume=never``
    over existing checkpoints refuses (``run.overwrite`` deletes them and starts fresh; stock OnExceptionCheckpoint
    would silently load them)."""
    runs = in_tmp / "runs"
    args = _task_args("ave", {"ave": ave_release}, runs, "x", epochs=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_cli(["fit", *args, "--ckpt_path=last"])
    ckpts = runs / "x" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"not a checkpoint: never read")
    with pytest.raises(FileExistsError, match="--run.resume auto.*--run.name.*--run.overwrite true"):
        run_cli(["fit", *args, "--trainer.max_steps=1"])
    with pytest.warns(UserWarning, match="run.overwrite: deleting"):
        assert run_cli(["fit", *args, "--trainer.max_steps=1", "--run.overwrite=true"]) == 0
    assert load(ckpts / "last.ckpt")["global_step"] == 1
