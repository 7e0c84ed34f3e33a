"""Checkpoints from elsewhere cannot run code: ``avmoe.files.load_checkpoint_safely`` and the HTS-AT loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avmoe.files import UnsafeCheckpointError, load_checkpoint_safely
from avmoe.models.backbones import htsat
from avmoe.models.config import AudioEncoderConfig

TINY = dict(num_mel_bins=16, spec_size=64, patch_size=4, hidden_size=8, depths=[1, 1], num_heads=[1, 1],
            window_size=4)


class WriteMarker:
    """Unpickling this object calls ``exec``, which writes ``marker``: a crafted checkpoint's payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save({"state_dict": {"sed_model.bn0.weight": torch.ones(16)}, "callbacks": WriteMarker(marker)}, path)
    return path, marker


def test_malicious_pickle_is_refused_and_never_runs(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError, match="GLOBAL exec") as err:
        load_checkpoint_safely(path, opt_in="--my.trust true")
    assert str(path) in str(err.value) and "--my.trust true" in str(err.value)
    assert not marker.exists()
    # The payload is real: trusting the file runs it (with a warning), which is why it is opt-in.
    with pytest.warns(UserWarning, match="can run arbitrary code"):
        load_checkpoint_safely(path, trust=True)
    assert marker.read_text() == "code ran"


def test_htsat_config_refuses_it_and_names_the_opt_in(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError) as err:
        htsat.build_htsat(AudioEncoderConfig(**TINY, htsat_checkpoint=str(path)))
    message = str(err.value)
    assert str(path) in message and "trust_checkpoint true" in message, message
    assert not marker.exists()


def test_lightning_style_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    """The layout of a PyTorch Lightning 1.5 checkpoint (state dict, optimizer and LambdaLR states, callback states
    keyed by strings) needs no allow-listed global."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    ckpt = {
        "epoch": 12, "global_step": 3400, "pytorch-lightning_version": "1.5.9",
        "state_dict": {f"sed_model.{k}": v for k, v in model.state_dict().items()},
        "callbacks": {"ModelCheckpoint{'monitor': 'mAP', 'mode': 'max'}": {
            "monitor": "mAP", "best_model_score": torch.tensor(0.47), "best_model_path": "/x/l-epoch=12.ckpt",
            "best_k_models": {"/x/l-epoch=12.ckpt": torch.tensor(0.47)}, "kth_value": torch.tensor(0.46)}},
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 13, "completed": 12}}}},
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    loaded = load_checkpoint_safely(path)
    assert loaded["epoch"] == 12 and torch.equal(loaded["state_dict"]["sed_model.weight"], model.weight)
    assert loaded["lr_schedulers"][0]["lr_lambdas"] == [None]  # functions are not pickled by LambdaLR


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint_safely(tmp_path / "nope.ckpt")
