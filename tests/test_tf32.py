"""``run.tf32``: on in the GPU presets, off elsewhere; the callback sets torch's TF32 switches on CUDA only and
restores them after the run."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule

from avmoe.callbacks import TF32Matmul
from avmoe.cli import AVMoECLI, cli_main
from avmoe.tasks.base import AVTask
from tests.helpers import CONFIGS

PRESETS = {"gpu": True, "ddp": True, "multinode": True, "cpu": False, "ddp_cpu": False}


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def ieee_fp32():
    """Start from TF32 off (torch's matmul default; cuDNN's default is on) and restore whatever was set."""
    before = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_trainer_presets_switch_tf32(preset: str) -> None:
    cfg = yaml.safe_load((CONFIGS / "trainer" / f"{preset}.yaml").read_text())
    assert bool((cfg.get("run") or {}).get("tf32", False)) is PRESETS[preset]


def test_gpu_preset_composes_into_the_run_config() -> None:
    out = io.StringIO()
    with mock.patch("sys.argv", ["avmoe"]), pytest.raises(SystemExit), redirect_stdout(out):
        cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "trainer" / "gpu.yaml"),
                  "--print_config"])
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["run"]["tf32"] is True and cfg["trainer"]["precision"] == "bf16-mixed"


def test_callback_sets_tf32_on_cuda_and_restores(ieee_fp32) -> None:
    cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    callback = TF32Matmul()
    callback.setup(cuda, None, "fit")  # type: ignore[arg-type]
    assert _flags() == (True, True)
    callback.teardown(cuda, None, "fit")  # type: ignore[arg-type]
    assert _flags() == (False, False)


def test_run_tf32_adds_the_callback_and_is_a_no_op_on_cpu(ieee_fp32, tmp_path) -> None:
    def built(*extra: str) -> tuple:
        with mock.patch("sys.argv", ["avmoe"]):
            cli = AVMoECLI(AVTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                           args=["--config", str(CONFIGS / "demo.yaml"), f"--run.root={tmp_path}",
                                 "--trainer.accelerator=cpu", "--trainer.logger=false", *extra])
        return cli.trainer, cli.model

    trainer, model = built("--run.tf32=true")
    [callback] = [c for c in trainer.callbacks if isinstance(c, TF32Matmul)]
    callback.setup(trainer, model, "fit")
    assert _flags() == (False, False)  # CPU: torch's switches untouched
    trainer, _ = built()
    assert not any(isinstance(c, TF32Matmul) for c in trainer.callbacks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_is_on_during_a_cuda_fit_and_restored_after(ieee_fp32, tmp_path) -> None:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, *args) -> None:
            seen.append(_flags())

    trainer = Trainer(accelerator="gpu", devices=1, precision="32-true", fast_dev_run=2, logger=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[TF32Matmul(), Probe()])
    trainer.fit(BoringModel())
    assert seen and all(flags == (True, True) for flags in seen)
    assert _flags() == (False, False)
