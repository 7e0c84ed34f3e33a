"""The test matrix: every balancing callback x every task (AVE, AVVP, AVS, AVQA) x {1 process, 2-process DDP}.

Short real fits (Lightning Trainer, the task's demo config, real decoded clips; 2 epochs of 1 optimizer step):

- 1 process, every callback x task: the fit acts (its parameters differ from the same fit without the
  callback, its own counter is non-zero, it logged its statistics) and stays finite;
- 1 process, per task, every callback at once: the epoch-0 checkpoint resumed for epoch 1 ends with exactly the
  parameters of the straight run (every callback's checkpointed state and RNG streams restored);
- 2-process DDP (gloo), per task, each callback alone and every callback at once: both replicas end
  bit-identical (the baseline too), the callback acted on both ranks (the same non-zero counter of each) and
  the parameters differ from the DDP baseline. Alone, each callback must change the parameters itself under
  DDP: in the fit with every callback, one that counts its actions but edits nothing would be hidden by the
  others;
- 2-process DDP, MMPareto with a fully skipped batch on one rank (``on_decode_error: skip``, batch 1): the
  empty rank joins MMPareto's own gradient all-reduce and combination; replicas stay identical.

Cost control: all DDP fits run inside one pair of rank processes (``tests/balance_matrix.py``: each rank loops
over every task and callback; the gloo group is created once), decoded clips are memoised per process, and the
resume check runs once per task on the fit with every callback. The settings of each callback (shortened
windows and warm-ups) are in ``tests/balance_matrix.py`` ``CALLBACKS``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import balance_matrix
from tests.helpers import REPO, TASK_CASES, task_config_problem

TASKS = list(TASK_CASES)
METHODS = list(balance_matrix.CALLBACKS)


@pytest.fixture(scope="module")
def releases(request) -> dict[str, str]:
    out = {}
    for task in TASKS:
        problem = task_config_problem(task)
        if problem:
            pytest.skip(problem)
        out[task] = str(request.getfixturevalue(TASK_CASES[task][1]))
    return out


@pytest.fixture(scope="module")
def single_process(releases, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("matrix1")
    return balance_matrix.run_all({"releases": releases, "root": str(root), "devices": 1, "methods": METHODS,
                                   "resume": True})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(root: Path, spec: dict, timeout: float) -> tuple[dict, dict]:
    """Run ``python -m tests.balance_matrix`` as the two ranks of a CPU DDP job; each rank's results."""
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOCAL_RANK": str(rank),
               "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.balance_matrix", str(path)], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            tails = [p.communicate()[0][-2000:] for p in procs]
            pytest.fail(f"the DDP ranks hung (> {timeout} s):\n" + "\n---\n".join(tails))
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    return tuple(json.loads((root / f"results_rank{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def two_processes(releases, tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("matrix2")
    # A hang guard: measured ~2 min at a load average of 2 on 2 cores, ~6 min at 7.
    return launch_ranks(root, {"releases": releases, "root": str(root), "devices": 2, "methods": METHODS},
                        timeout=1500)


def _baseline(base: dict, run: dict) -> str:
    """The baseline's parameters after as many epochs as ``run`` trained."""
    assert base["sha_epochs"][-1] == base["sha"], "the baseline's epoch digests end with its final parameters"
    return base["sha_epochs"][run["epochs"] - 1]


def _costs(results: dict) -> str:
    """Seconds per fit kind, summed over tasks (printed: what each part of the matrix costs)."""
    sums: dict[str, float] = {}
    for key, run in results.items():
        kind = key.split("/", 1)[1]
        sums[kind] = sums.get(kind, 0.0) + run["seconds"]
    return ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in sums.items())


def _check(failures: list[str], cell: str, ok: bool, why: str) -> None:
    if not ok:
        failures.append(f"{cell}: {why}")


# One test per process layout, each checking every cell (a failure lists them all): the module-scoped runs must
# happen once, and pytest-xdist would run each parametrized test's fixture again on every worker.
@pytest.mark.slow
def test_every_callback_on_every_task_single_process(single_process):
    print("1 process:", _costs(single_process))
    failures: list[str] = []
    for task in TASKS:
        base = single_process[f"{task}/baseline"]
        for method in METHODS:
            run, cell = single_process[f"{task}/{method}"], f"{task} x {method}"
            _check(failures, cell, run["finite"], "non-finite parameters")
            _check(failures, cell, run["counters"][0] > 0, f"its counter is {run['counters'][0]}")
            _check(failures, cell, run["sha"] != _baseline(base, run), "parameters equal to the fit without it")
            prefix = {"ogm_ge": "ogm"}.get(method, method)
            _check(failures, cell, prefix in run["logged"], f"logged nothing under {prefix}/ ({run['logged']})")
        run, resumed, cell = single_process[f"{task}/all"], single_process[f"{task}/all/resumed"], f"{task} x all"
        _check(failures, cell, all(c > 0 for c in run["counters"]), f"counters {run['counters']}")
        _check(failures, cell, resumed["counters"] == run["counters"], "resumed counters differ")
        _check(failures, cell, resumed["sha"] == run["sha"], "the resumed run differs from the straight run")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.ddp
def test_every_callback_on_every_task_two_process_ddp(two_processes):
    rank0, rank1 = two_processes
    print("DDP, rank 0:", _costs(rank0))
    failures: list[str] = []
    for task in TASKS:
        base = rank0[f"{task}/baseline"]
        _check(failures, f"{task} (DDP)", rank1[f"{task}/baseline"]["sha"] == base["sha"], "baseline replicas diverged")
        for method in [*METHODS, "all"]:
            run, other, cell = rank0[f"{task}/{method}"], rank1[f"{task}/{method}"], f"{task} x {method} (DDP)"
            _check(failures, cell, other["sha"] == run["sha"], "replicas diverged")
            _check(failures, cell, run["finite"] and run["sha"] != _baseline(base, run), "did not act (or non-finite)")
            _check(failures, cell, run["counters"] == other["counters"],
                   f"ranks decided differently {run['counters']} vs {other['counters']}")
            names = METHODS if method == "all" else [method]
            _check(failures, cell, all(c > 0 for c in run["counters"]), f"{dict(zip(names, run['counters']))}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ a fully skipped batch
@pytest.fixture(scope="module")
def broken_ave(ave_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AVE test release with train sample 0 not decodable: with batch 1 per rank it is rank 0's first
    batch (EpochSampler, seed 0: rank 0 gets samples 0, 3, 1 of 6), which is then empty."""
    from avmoe.datamodules import AVEDataModule

    root = tmp_path_factory.mktemp("broken_matrix") / "ave"
    shutil.copytree(ave_release, root)
    Path(AVEDataModule(str(root), num_workers=0).dataset("train").video_path(0)).write_bytes(b"\x00not an mp4" * 64)
    return root


@pytest.mark.ddp
def test_mmpareto_ddp_with_a_fully_skipped_batch_on_one_rank(broken_ave, tmp_path):
    """MMPareto all-reduces its per-loss gradients itself; the rank whose batch lost its only clip must join that
    all-reduce (with zeros) and combine like the other, not fall back to DDP's bucketed backward (mismatched
    collectives: a hang or an error) nor skip the combination (replicas diverge)."""
    rank0, rank1 = launch_ranks(tmp_path, {"kind": "skip", "release": str(broken_ave), "root": str(tmp_path)},
                                timeout=240)
    a, b = rank0["skip"], rank1["skip"]
    assert (a["empty_steps"], b["empty_steps"]) == (1, 0), "rank 0's first batch is empty, rank 1 has none"
    assert a["global_step"] == b["global_step"] == 2
    assert a["num_combined"] == b["num_combined"] == 2, "both ranks combined on both steps, the empty one too"
    assert a["finite"] and b["finite"]
    assert a["sha"] == b["sha"], "replicas diverged"
