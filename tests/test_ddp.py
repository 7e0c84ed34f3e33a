"""DDP: sharding without padding, per-rank seeding, presets, and 2-process CPU runs of every task.

The end-to-end test launches the real CLI as a subprocess with ``--trainer.strategy=ddp --trainer.devices=2
--trainer.accelerator=cpu`` (gloo; ``strategy=ddp`` re-executes the command line, so it cannot run inside
pytest), a balancing callback on and :class:`~avmoe.callbacks.ParameterChecksum` writing a digest per rank. It
checks that both replicas end identical and that the 2-process validation and test metrics equal a 1-process
``validate``/``test`` of the same checkpoints on the same data (uneven shard sizes included).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import yaml

from avmoe.cli import cli_main
from avmoe.datamodules import AVEDataModule, LogMelConfig
from avmoe.datamodules.sampling import EpochSampler
from tests.helpers import CONFIGS, REPO, TASK_CASES, one_thread, task_config_problem, task_fit_args

AUDIO = LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32, fmax=8000.0)


def fake_trainer(world: int, rank: int, device: str = "cpu") -> Any:
    """What AVDataModule reads from its trainer when it builds loaders."""
    strategy = SimpleNamespace(root_device=torch.device(device))
    return SimpleNamespace(world_size=world, global_rank=rank, strategy=strategy,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))


def _datamodule(root: Path, world: int, rank: int, **kwargs: Any) -> AVEDataModule:
    kwargs = {"batch_size": 2, "num_workers": 0, "image_size": 64, "audio": AUDIO, "seed": 5, **kwargs}
    dm = AVEDataModule(str(root), **kwargs)
    dm.trainer = fake_trainer(world, rank)
    return dm


def _indices(loader: Any) -> list[int]:
    return [int(key[1]) if isinstance(key, tuple) else int(key) for key in loader.sampler]


def test_eval_shards_cover_every_sample_once_without_padding(ave_release):
    shards = []
    for rank in (0, 1):
        dm = _datamodule(ave_release, world=2, rank=rank, limit_samples=5)
        dm.setup("validate")
        loader = dm.val_dataloader()
        assert not loader.pin_memory, "no pinned memory for a CPU run"
        shards.append(_indices(loader))
    assert sorted(shards[0] + shards[1]) == list(range(5)), shards  # 3 + 2: uneven, nothing repeated


def test_train_shards_and_order_per_rank(ave_release):
    loaders = []
    for rank in (0, 1):
        dm = _datamodule(ave_release, world=2, rank=rank)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, EpochSampler), "a DistributedSampler subclass: Lightning keeps it"
        loader.sampler.set_epoch(3)
        loaders.append(loader)
    a, b = (_indices(x) for x in loaders)
    assert not set(a) & set(b) and sorted(a + b) == list(range(16))
    again = _datamodule(ave_release, world=2, rank=0)
    again.setup("fit")
    loader = again.train_dataloader()
    loader.sampler.set_epoch(3)
    assert _indices(loader) == a, "the order is a function of (seed, epoch, rank)"


def test_worker_init_gets_the_rank(ave_release):
    dm = _datamodule(ave_release, world=2, rank=1, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.worker_init_fn.keywords == {"rank": 1}
    assert loader.persistent_workers and loader.generator is not None


def test_pin_memory_follows_the_trainer_device(ave_release):
    dm = AVEDataModule(str(ave_release), num_workers=0, image_size=64, audio=AUDIO)
    dm.trainer = fake_trainer(1, 0, device="cuda")
    dm.setup("validate")
    assert dm.val_dataloader().pin_memory
    dm.pin_memory = False
    assert not dm.val_dataloader().pin_memory


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "ddp_cpu", "multinode"])
def test_trainer_presets_parse(preset):
    out = io.StringIO()
    args = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "trainer" / f"{preset}.yaml"),
            "--print_config"]
    with mock.patch("sys.argv", ["avmoe"]), pytest.raises(SystemExit), redirect_stdout(out):
        cli_main(args)
    trainer = yaml.safe_load(out.getvalue())["trainer"]
    if preset in ("ddp", "ddp_cpu", "multinode"):
        assert trainer["strategy"] == "ddp"
    if preset == "multinode":
        env = trainer["plugins"][0]
        assert env["class_path"].endswith("SLURMEnvironment") and env["init_args"]["auto_requeue"] is True


# ------------------------------------------------------------------------------------------------ 2 processes
def run_cli(args: list[str]) -> None:
    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(args)


def metrics(folder: Path, split: str) -> dict[str, float]:
    return json.loads((folder / "metrics" / f"{split}.json").read_text())["metrics"]


def assert_same_metrics(ddp: dict[str, float], single: dict[str, float]) -> None:
    """Same keys; identical values of the official metrics, computed once per sample from gathered rows.

    Evaluation runs one clip per batch with one thread in both runs, so each clip's outputs are computed the
    same way bit for bit (with other batch compositions, last-bit differences flip pixels of the untrained
    AVS masks around the threshold). Losses are left out: they are means over batches (AVE's class loss averages
    the event clips of a batch), so they depend on the grouping, which differs between 1 and 2 processes.
    """
    assert set(ddp) == set(single), (ddp, single)
    official = [k for k in ddp if "loss" not in k.rsplit("/", 1)[-1]]
    assert official, ddp
    assert {k: ddp[k] for k in official} == {k: single[k] for k in official}


@pytest.fixture
def release(request) -> Path:
    task = request.node.callspec.params["task"]
    problem = task_config_problem(task)
    if problem:
        pytest.skip(problem)
    return request.getfixturevalue(TASK_CASES[task][1])


EVAL_SAMPLES = 5  # odd: the 2 ranks get 3 and 2 samples, no padding


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("task", list(TASK_CASES))
def test_ddp_fit_keeps_replicas_identical_and_metrics_equal_one_process(task, release, in_tmp):
    runs = in_tmp / "runs"
    callbacks = CONFIGS / "callbacks" / "ogm_ge.yaml"
    args = task_fit_args(task, release, runs, name="ddp", **{
        "data.init_args.limit_samples": EVAL_SAMPLES, "data.init_args.eval_batch_size": 1,
        "trainer.limit_train_batches": 2,
        "run.test_after_fit": "true", "trainer.strategy": "ddp", "trainer.devices": 2,
        "trainer.accelerator": "cpu"})
    args += ["--config", str(callbacks)] if callbacks.is_file() else []
    args += ["--trainer.callbacks+=avmoe.callbacks.ParameterChecksum"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "avmoe", "fit", *args], env=env, cwd=in_tmp, timeout=400,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    folder = runs / "ddp"

    digests = [json.loads((folder / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in digests] == [2, 2]
    final = [d["steps"][max(d["steps"], key=int)] for d in digests]
    assert final[0]["sha256"] == final[1]["sha256"], "DDP replicas diverged"
    assert int(max(digests[0]["steps"], key=int)) == 2, "2 optimizer steps (the train shards are not padded twice)"

    # The same checkpoints and data in one process: test with best.ckpt (as test_after_fit did under DDP), val
    # with the final weights.
    single = task_fit_args(task, release, runs, name="single", **{"data.init_args.limit_samples": EVAL_SAMPLES,
                                                                  "data.init_args.eval_batch_size": 1})
    with one_thread():
        run_cli(["test", *single, f"--ckpt_path={folder / 'checkpoints' / 'best.ckpt'}"])
        if task == "ave":  # the validation loader shards the same way (one task is enough)
            run_cli(["validate", *single, f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"])
    # fit writes metrics/{val,test}.json; a standalone test / validate metrics/<subcommand>_<split>.json
    assert_same_metrics(metrics(folder, "test"), metrics(runs / "single", "test_test"))
    if task == "ave":
        assert_same_metrics(metrics(folder, "val"), metrics(runs / "single", "validate_val"))


# ------------------------------------------------------------------------------------------------ data at scale
def _demo_datamodule(task: str, root: Path) -> Any:
    """The DataModule of ``task``'s demo config on ``root`` (in-process decoding, no cache)."""
    import importlib

    data = yaml.safe_load((CONFIGS / TASK_CASES[task][0]).read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    kwargs = {**data.get("init_args", {}), "root": str(root), "num_workers": 0}
    kwargs.pop("cache_dir", None)
    return getattr(importlib.import_module(module), name)(**kwargs)


def _open_files_under(root: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue
    return [t for t in targets if t.startswith(str(root.resolve()))]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("task", list(TASK_CASES))
def test_decoders_open_per_item_and_metadata_is_compact(task, release):
    """Datasets hold no open media file (workers fork them) and keep per-sample metadata in numpy arrays."""
    import pickle

    import numpy as np

    dm = _demo_datamodule(task, release)
    dm.setup("fit")
    dataset = dm.dataset("train")
    base = getattr(dataset, "dataset", dataset)  # limit_samples wraps it in a Subset
    assert not _open_files_under(release), "a Dataset must not open media files before __getitem__"
    sample = dataset[0]
    assert sample["video"].dtype == torch.uint8
    assert not _open_files_under(release), "decoders are closed when __getitem__ returns"
    pickle.dumps(dataset)  # what a spawned worker receives
    per_sample = {k: v for k, v in vars(base).items()
                  if isinstance(v, (list, tuple, dict, np.ndarray)) and len(v) >= len(base)}
    assert per_sample, f"{type(base).__name__}: no per-sample metadata found"
    bulky = {k: type(v).__name__ for k, v in per_sample.items()
             if not isinstance(v, np.ndarray) or v.dtype == object}
    assert not bulky, f"{type(base).__name__}: per-sample Python objects (copy-on-read in workers): {bulky}"


def test_data_throughput_benchmark_runs_tiny(tmp_path):
    from bench import data_throughput

    results = data_throughput.main(["--tiny", "--root", str(tmp_path), "--datasets", "ave"])
    assert [(r.dataset, r.workers) for r in results] == [("ave", 1)]
    assert results[0].clips > 0 and results[0].clips_per_s > 0
