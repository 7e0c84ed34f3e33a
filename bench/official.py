"""The official AVMoE AVE model (``MMIL_Net``, ``AVMOE/AVE/nets/net_trans_v3.py`` of github.com/yingchengy/AVMOE)
built from a local checkout, for side-by-side timing with avmoe in one process. The official code is never
copied into this repository: pass the checkout's root (the folder holding ``AVMOE/``).

Set-up as in ``AVMOE/AVE/train.sh`` (large model, CMBS + temporal attention, 1+1 experts, skip 2, BN, gates,
2 conv groups, r = 8, 32 tokens) and the training loop of ``main_trans_v3.py`` (``model.train()``, the three
losses, Adam over the adapter/CMBS/temporal-attention parameters with the script's parameter groups). Random
weights: ``timm.create_model(..., pretrained=False)`` and the HTS-AT checkpoint load skipped (no network, no
files). Needs ``timm`` 0.6.x (0.6.13 runs on Python 3.11), ``einops``, ``torchlibrosa``; ``ipdb``, ``loralib``, ``h5py``, ``tqdm``
and ``torchvision`` are imported but unused by this model and are stubbed when absent.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

SAMPLE_RATE = 32000  # official waveform input: 1 s of 32 kHz audio per segment

# AVMOE/AVE/train.sh (plus the flags it passes explicitly).
TRAIN_SH = dict(
    model_size="large", is_cmbs=1, is_temporal_att=1, is_inter_in_cmbs=0, num_multimodal_experts=1,
    num_singlemodal_experts=1, num_skip=2, is_gate=1, is_bn=1, is_post_layernorm=1, is_before_layernorm=1,
    num_conv_group=2, Adapter_downsample=8, is_self_attention=0, is_audio_adapter_p1=1, is_audio_adapter_p2=1,
    num_tokens=32, backbone_type="audioset", lr=5e-4, lr_mlp=5e-6, is_vit_ln=0,
)


class _Stub(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty stand-ins for imported-but-unused packages that are not installed."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]


def _stub_missing(names: list[str]) -> None:
    missing = {n for n in names if importlib.util.find_spec(n) is None}
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))


def load_official_ave(root: str | Path) -> nn.Module:
    """``MMIL_Net`` of the official AVE code under ``root`` with random weights, trainable parameters as scripted."""
    ave = Path(root) / "AVMOE" / "AVE"
    if not (ave / "nets" / "net_trans_v3.py").is_file():
        raise FileNotFoundError(f"{ave / 'nets' / 'net_trans_v3.py'} not found: pass the root of a checkout of "
                                "github.com/yingchengy/AVMOE (the folder holding AVMOE/)")
    for name in ("timm", "einops", "torchlibrosa"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"the official AVMoE code needs {name!r} (timm 0.6.x); install it to compare")
    _stub_missing(["ipdb", "loralib", "torchvision", "h5py", "tqdm"])
    sys.path.insert(0, str(ave))
    import timm

    create, load, load_state = timm.create_model, torch.load, nn.Module.load_state_dict
    timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)
    torch.load = lambda *a, **kw: {"state_dict": {}}  # the HTS-AT checkpoint: random weights instead
    nn.Module.load_state_dict = lambda self, *a, **kw: None
    try:
        net = importlib.import_module("nets.net_trans_v3")
        model = net.MMIL_Net(SimpleNamespace(**TRAIN_SH))
    finally:
        timm.create_model, torch.load, nn.Module.load_state_dict = create, load, load_state
    for name, param in model.named_parameters():  # main_trans_v3.py: only these are trained
        param.requires_grad = any(k in name for k in ("adapter_blocks", "CMBS", "mlp_class", "temporal_attn"))
    return model


def official_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The script's Adam: one group per trainable parameter (lr_mlp for ``mlp_class``, else lr)."""
    groups = [{"params": p, "lr": TRAIN_SH["lr_mlp"] if "mlp_class" in n else TRAIN_SH["lr"]}
              for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.Adam(groups)


def official_batch(clips: int, frames: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Official inputs: normalised frames (B, T, 3, 192, 192), waveforms (B, T, 32000), one-hot labels (B, T, 29)."""
    label = torch.nn.functional.one_hot(torch.randint(0, 29, (clips, frames)), 29).float()
    return {"image": torch.randn(clips, frames, 3, 192, 192, device=device),
            "wave": torch.randn(clips, frames, SAMPLE_RATE, device=device) * 0.1, "GT": label.to(device)}


def official_step(model: nn.Module, opt: torch.optim.Optimizer | None, batch: dict[str, torch.Tensor]) -> None:
    """One step of ``main_trans_v3.train`` (``opt`` None: a forward only, under no_grad, as its evaluation)."""
    if opt is None:
        with torch.no_grad():
            model([batch["wave"]], batch["image"])
        return
    is_event, event, av_score, _ = model([batch["wave"]], batch["image"], stage="train")
    is_event = is_event.transpose(1, 0).squeeze(-1).contiguous()
    labels_bce, labels_evn = batch["GT"][:, :, :-1].max(-1)
    labels_event, _ = labels_evn.max(-1)
    loss = (nn.functional.binary_cross_entropy_with_logits(is_event, labels_bce)
            + nn.functional.cross_entropy(event, labels_event) + nn.functional.cross_entropy(av_score, labels_event))
    loss.backward()
    opt.step()
    opt.zero_grad()


def official_name(precision: str) -> str:
    """Row name of the official code at ``precision`` ("official" for fp32)."""
    return "official" if precision == "32-true" else f"official {precision}"


def official_runners(
    root: str | Path, clips: int, frames: int, train: bool, precisions: list[str],
    device: torch.device = torch.device("cpu"),
) -> dict[str, Callable[[], None]]:
    """Row name -> zero-argument callable running one official step (``train``) or forward on fixed in-memory
    inputs, one per precision; they share one model and optimizer (memory). ``bf16-mixed`` wraps the step in
    ``torch.autocast(bfloat16)``, as a user of the official code would add it (the official scripts run fp32)."""
    model = load_official_ave(root).to(device)
    model.train(train)  # the official loop trains in train mode, evaluates in eval mode
    opt = official_optimizer(model) if train else None
    batch = official_batch(clips, frames, device)

    def runner(precision: str) -> Callable[[], None]:
        def run() -> None:
            if precision == "bf16-mixed":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    official_step(model, opt, batch)
            else:
                official_step(model, opt, batch)
        return run

    return {official_name(p): runner(p) for p in precisions}
