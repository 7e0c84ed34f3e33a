"""The private / internal transformers and Lightning APIs of ``avmoe._private_api`` still exist and behave as the
backbone and data code assume. A failure here names the internal that changed: check the pinned ranges in
setup.cfg against the installed versions, then adapt ``avmoe._private_api`` and its callers."""

from __future__ import annotations

import inspect
import sys
import subprocess

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import ClapAudioConfig, ClapAudioModel, Swinv2Config, Swinv2Model

import avmoe._private_api as api

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_SIGNATURES = {  # parameter names the backbone passes (positionally), per internal
    "window_partition": ["input_feature", "window_size"],
    "window_reverse": ["windows", "window_size", "height", "width"],
    "Swinv2Layer.maybe_pad": ["self", "hidden_states", "height", "width"],
    "Swinv2Layer.get_attn_mask": ["self", "height", "width", "dtype", "device"],
    "Swinv2Layer.forward": ["self", "hidden_states", "input_dimensions"],
    "Swinv2Stage.forward": ["self", "hidden_states", "input_dimensions"],
    "ClapAudioLayer.forward": ["self", "hidden_states", "input_dimensions"],
    "ClapAudioStage.forward": ["self", "hidden_states", "input_dimensions"],
}


def _resolve(dotted: str):
    obj = api
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_internals_exist() -> None:
    missing = []
    for name, (module, reason) in api.TRANSFORMERS_INTERNALS.items():
        try:
            getattr(api, name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{module}.{name} ({reason}): {err}")
    assert not missing, "transformers internals gone:\n" + "\n".join(missing)


def test_signatures_are_the_ones_called() -> None:
    changed = []
    for dotted, expected in EXPECTED_SIGNATURES.items():
        params = list(inspect.signature(_resolve(dotted)).parameters)
        if params[: len(expected)] != expected:
            changed.append(f"{dotted}: expected leading parameters {expected}, found {params}")
    assert not changed, "transformers internals changed signature:\n" + "\n".join(changed)


def test_importing_the_module_imports_neither_library() -> None:
    code = ("import sys, avmoe._private_api; "
            "print(sorted(m for m in ('transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture(scope="module")
def swin() -> Swinv2Model:
    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4)
    return Swinv2Model(cfg).eval()


def _reference_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


def _reference_mask(h: int, wd: int, w: int, s: int) -> torch.Tensor:
    """The original Swin shifted-window mask (microsoft/Swin-Transformer ``SwinTransformerBlock``): 9 regions, -100."""
    img = torch.zeros(1, h, wd, 1)
    count = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = count
            count += 1
    win = _reference_partition(img, w).view(-1, w * w)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def test_swinv2_layer_members_and_behaviour(swin: Swinv2Model) -> None:
    plain, shifted = swin.encoder.layers[0].blocks  # grid 8x8, window 4: shift 0 then 2
    absent = [m for m in api.SWINV2_LAYER_MEMBERS if not hasattr(shifted, m)]
    assert not absent, f"Swinv2Layer lacks {absent}"
    assert (plain.window_size, plain.shift_size, shifted.shift_size) == (4, 0, 2)
    x = torch.randn(3, 6, 6, 8)
    padded, pad = plain.maybe_pad(x, 6, 6)
    assert padded.shape == (3, 8, 8, 8) and len(pad) == 6 and (pad[3], pad[5]) == (2, 2), pad  # swin.py reads 3, 5
    assert torch.equal(padded[:, :6, :6], x) and not padded[:, 6:].any()
    assert plain.get_attn_mask(8, 8, dtype=torch.float32) is None
    torch.testing.assert_close(shifted.get_attn_mask(8, 8, dtype=torch.float32), _reference_mask(8, 8, 4, 2))
    y = torch.randn(2, 8, 8, 5)
    win = api.window_partition(y, 4)
    assert torch.equal(win, _reference_partition(y, 4))
    assert torch.equal(api.window_reverse(win, 4, 8, 8), y)
    out = shifted(torch.randn(2, 64, 8), (8, 8))
    assert isinstance(out, tuple) and out[0].shape == (2, 64, 8)
    tokens, grid = swin.embeddings(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 64, 8) and tuple(int(g) for g in grid) == (8, 8)
    assert tuple(swin.embeddings.patch_grid) == (8, 8) and swin.encoder.layers[0].dim == 8


def test_clap_audio_members_and_behaviour() -> None:
    cfg = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=8, depths=[1, 1],
                          num_attention_heads=[1, 2], window_size=4, patch_stride=[4, 4], enable_fusion=False)
    model = ClapAudioModel(cfg).eval()
    enc = model.audio_encoder
    absent = [m for m in api.CLAP_AUDIO_ENCODER_MEMBERS if not hasattr(enc, m)]
    assert not absent, f"ClapAudioEncoder lacks {absent}"
    assert isinstance(enc.layers[0], api.ClapAudioStage) and isinstance(enc.layers[0].blocks[0], api.ClapAudioLayer)
    mel = torch.randn(2, 1, 101, 16)
    img = enc.reshape_mel2img(enc.batch_norm(mel.transpose(1, 3)).transpose(1, 3))
    assert img.shape == (2, 1, 64, 64)
    tokens = enc.patch_embed(img, None)
    assert tokens.shape == (2, 256, 8) and tuple(enc.input_resolutions[0]) == (16, 16)
    out = enc.layers[0].blocks[0](tokens, (16, 16))
    assert isinstance(out, tuple) and out[0].shape == tokens.shape


def test_lightning_trainer_flags() -> None:
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert api.uses_distributed_sampler(Trainer(**kwargs)) is True
    assert api.uses_distributed_sampler(Trainer(use_distributed_sampler=False, **kwargs)) is False
    fit_loop = Trainer(**kwargs).fit_loop
    assert hasattr(fit_loop, "_combined_loader") and hasattr(fit_loop, "_data_fetcher"), "FitLoop cache renamed"
    fit_loop._combined_loader = object()
    assert api.drop_cached_train_loader(fit_loop) is True and fit_loop._combined_loader is None


def test_lightning_cli_internals_that_avmoe_cli_overrides() -> None:
    from lightning.pytorch.cli import LightningCLI

    import avmoe.cli

    signatures = {"_instantiate_trainer": ["self", "config", "callbacks"], "_parse_ckpt_path": ["self"]}
    for name, params in signatures.items():
        assert list(inspect.signature(getattr(LightningCLI, name)).parameters) == params, f"LightningCLI.{name}"
        assert name in vars(avmoe.cli.AVMoECLI), f"avmoe.cli no longer overrides {name}: update avmoe._private_api"
    # an instance attribute set in LightningCLI.__init__ (read by AVMoECLI._user_model_args)
    assert "self._subcommand_parsers" in inspect.getsource(LightningCLI), "LightningCLI._subcommand_parsers renamed"
    assert set(api.LIGHTNING_CLI_INTERNALS) == {*signatures, "_subcommand_parsers"}


def test_cluster_environment_fallback() -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert getattr(trainer.strategy, "cluster_environment", None) is None  # single device: only the private one
    assert isinstance(api.cluster_environment(trainer), LightningEnvironment)


def test_onednn_linear_operator_and_behaviour() -> None:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    assert op is not None, "torch.ops.mkldnn._linear_pointwise is gone: models/backbones/gemm.py needs a new route"
    args = [a.name for a in op.default._schema.arguments]
    assert args == ["X", "W", "B", "attr", "scalars", "algorithm"], f"_linear_pointwise changed signature: {args}"
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 7, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(api.onednn_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    grad = torch.randn(2, 5, 7, 16, generator=g)  # the backward product: a strided (transposed) weight, no bias
    torch.testing.assert_close(api.onednn_linear(grad, w.t(), None), grad @ w)


def test_library_mlp_members(swin: Swinv2Model) -> None:
    cfg = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=8, depths=[1, 1],
                          num_attention_heads=[1, 2], window_size=4, patch_stride=[4, 4], enable_fusion=False)
    layers = {"Swinv2Layer": swin.encoder.layers[0].blocks[0],
              "ClapAudioLayer": ClapAudioModel(cfg).eval().audio_encoder.layers[0].blocks[0]}
    for kind, layer in layers.items():
        for part, members in api.MLP_MEMBERS.items():
            absent = [m for m in members if not hasattr(getattr(layer, part), m)]
            assert not absent, f"{kind}.{part} lacks {absent}"
        x = torch.randn(2, 6, layer.intermediate.dense.in_features)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        expected = layer.output.dropout(layer.output.dense(inner))
        # the fast path's re-step of the MLP must be what the modules' own forwards compute (eval: no dropout)
        torch.testing.assert_close(layer.output(layer.intermediate(x)), expected)
