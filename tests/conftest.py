"""Shared fixtures: hygiene (process groups, default dtype, cwd) and tiny generated releases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


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



