"""Shared fixtures: hygiene (process groups, default dtype, cwd) and tiny generated releases."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported: one intra-op thread per process (2-core CI runs DataLoader workers and DDP ranks
# beside the main process; oversubscription made tiny-model steps up to 10x slower). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import helpers  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _cost_rank(item: pytest.Item) -> int:
    """0: multi-process (``ddp``), 1: end-to-end (``slow``), 2: the rest."""
    return 0 if item.get_closest_marker("ddp") else 1 if item.get_closest_marker("slow") else 2


@pytest.hookimpl(trylast=True)  # after pytest's own fixture-scope ordering, which the stable sort keeps per rank
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest tests first. pytest-xdist hands out tests in collection order; a multi-process test collected late
    (files run alphabetically) kept one worker busy for a minute after the other had run out of work."""
    items.sort(key=_cost_rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    helpers.calm_gc()  # after collection: every test module is imported


@pytest.fixture(autouse=True)
def _destroy_process_group():
    """A test that fails inside DDP must not leak its process group into the next one."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def one_thread():
    """Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (see :func:`tests.helpers.one_thread`)."""
    with helpers.one_thread():
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run inside tmp_path so runs/ and lightning_logs/ never land in the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def ave_release(tmp_path_factory) -> Path:
    """A tiny synthetic AVE release in the official on-disk format (real H.264/AAC mp4 files)."""
    from avmoe.datamodules.synthetic.ave import write_ave_release

    root = tmp_path_factory.mktemp("ave_release")
    return write_ave_release(root, num_train=16, num_val=6, num_test=8, num_categories=3, seed=0)





def _writer(name: str):
    import avmoe.datamodules.synthetic as synthetic

    if not hasattr(synthetic, name):
        pytest.skip(f"synthetic writer {name} does not exist yet")
    return getattr(synthetic, name)


@pytest.fixture(scope="session")
def llp_release(tmp_path_factory) -> Path:
    """A tiny synthetic LLP (AVVP) release (real mp4 files, TAB-separated CSVs)."""
    root = tmp_path_factory.mktemp("llp_release")
    return _writer("write_llp_release")(root, num_train=8, num_val=4, num_test=5, num_categories=3, seed=0)


@pytest.fixture(scope="session")
def avs_release(tmp_path_factory) -> Path:
    """A tiny synthetic AVSBench S4 release (224x224 PNG frames and masks, wavs)."""
    root = tmp_path_factory.mktemp("avs_release")
    return _writer("write_avsbench_release")(root, setting="s4", num_train=8, num_val=4, num_test=5,
                                             num_categories=3, seed=0)


@pytest.fixture(scope="session")
def avqa_release(tmp_path_factory) -> Path:
    """A tiny synthetic MUSIC-AVQA release (12 videos: 20 train, 5 val, 11 test questions)."""
    root = tmp_path_factory.mktemp("avqa_release")
    return _writer("write_musicavqa_release")(root, num_videos=12, questions_per_video=3, seed=0)
