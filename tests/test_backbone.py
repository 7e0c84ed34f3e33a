"""AVMoEBackbone: exactness against the library forwards, gradients, shapes, configs, modes, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import ClapConfig, ClapModel, ClapTextConfig

from avmoe.models import PAPER_CONFIGS, AVMoEBackbone, BackboneOutput, paper_adapter, tiny_config
from avmoe.models.backbones import htsat
from avmoe.models.moe import load_balance_loss

pytestmark = [pytest.mark.filterwarnings("ignore:.*RANDOM weights"), pytest.mark.usefixtures("one_thread")]

B, T = 2, 3


def _inputs(b: int = B, t: int = T, size: int = 64, mels: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8, generator=g)
    return video, torch.randn(b, t, 101, mels, generator=g)


def _open_gates(model: nn.Module) -> None:
    """Non-zero output gates and g_av/gate_self so every adapter parameter influences the output."""
    for name, p in model.named_parameters():
        if name.endswith("gate") or name.endswith("gate_av"):
            p.data.fill_(0.5)


def _adapter_params(model: AVMoEBackbone) -> list[nn.Parameter]:
    return list(model.adapters.parameters())


def _library_visual_stages(model: AVMoEBackbone, video: Tensor) -> list[Tensor]:
    """Per-stage Swin outputs before patch merging from the library encoder (last one after the final norm)."""
    swin = model.visual_encoder
    emb, dims = swin.embeddings(model.preprocess_video(video))
    out = swin.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    stages = list(out.hidden_states[1:])
    stages[-1] = swin.layernorm(stages[-1])
    return stages


# --------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("adapter", [{"enabled": False}, {"audio_gate": True}], ids=["no_adapters", "zero_gates"])
def test_stepped_backbone_equals_library_forward(adapter: dict) -> None:
    torch.manual_seed(0)
    # The library path (fast=False) is bit-identical; the fast path is checked in tests/test_fast_paths.py.
    model = AVMoEBackbone(tiny_config(adapter=adapter, fast=False)).train()  # adapters in train: BN batch stats
    video, audio = _inputs()
    out = model(video, audio)
    with torch.no_grad():
        ref_v = model.visual_encoder(pixel_values=model.preprocess_video(video)).last_hidden_state
        ref_a = htsat.library_tokens(model.audio_encoder, audio.flatten(0, 1).unsqueeze(1))
        ref_stages = _library_visual_stages(model, video)
    assert torch.equal(out.visual_tokens.flatten(0, 1), ref_v)
    assert torch.equal(out.audio_tokens.flatten(0, 1), ref_a)
    for got, ref in zip(out.visual_stages, ref_stages, strict=True):
        assert torch.equal(got.flatten(0, 1), ref)
    assert torch.equal(out.visual, out.visual_tokens.mean(2))
    assert torch.equal(out.audio, out.audio_tokens.mean(2))
    assert torch.equal(model.encode_visual_plain(video), out.visual_tokens)


def test_adapters_change_outputs_once_gates_open() -> None:
    model = AVMoEBackbone(tiny_config(fast=False)).eval()  # fast=False: bit-identical to encode_visual_plain
    video, audio = _inputs()
    before = model(video, audio)
    _open_gates(model)
    after = model(video, audio)
    assert not torch.allclose(before.visual_tokens, after.visual_tokens)
    assert not torch.allclose(before.audio_tokens, after.audio_tokens)
    assert torch.equal(model.encode_visual_plain(video), before.visual_tokens)  # plain path ignores adapters


# --------------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_adapters_not_frozen_encoders() -> None:
    model = AVMoEBackbone(tiny_config()).train()
    _open_gates(model)
    out = model(*_inputs())
    (out.visual.square().mean() + out.audio.square().mean() + out.visual_stages[0].mean()).backward()
    for name, p in model.adapters.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for p in list(model.visual_encoder.parameters()) + list(model.audio_encoder.parameters()):
        assert not p.requires_grad and p.grad is None


def test_zero_gates_still_receive_gradient() -> None:
    model = AVMoEBackbone(tiny_config()).train()
    out = model(*_inputs())
    (out.visual.square().mean() + out.audio.square().mean()).backward()
    gates = [p for n, p in model.adapters.named_parameters() if n.endswith("experts.0.gate")]
    assert gates and all(g.grad is not None and g.grad.abs().item() > 0 for g in gates)


def test_gradient_checkpointing_matches_plain() -> None:
    torch.manual_seed(0)
    plain = AVMoEBackbone(tiny_config()).train()
    _open_gates(plain)
    ckpt = AVMoEBackbone(tiny_config(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        out = model(*_inputs())
        (out.visual.square().mean() + out.audio.square().mean()).backward()
        grads.append([p.grad for p in model.adapters.parameters()])
    for g_plain, g_ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- shapes and contracts
def test_shapes_and_feature_dims() -> None:
    model = AVMoEBackbone(tiny_config()).eval()
    out = model(*_inputs())
    dims = model.feature_dims
    assert isinstance(out, BackboneOutput)
    assert out.visual.shape == (B, T, dims["visual"]) and out.audio.shape == (B, T, dims["audio"])
    assert out.visual_tokens.shape == (B, T, dims["visual_tokens"], dims["visual"])
    assert out.audio_tokens.shape == (B, T, dims["audio_tokens"], dims["audio"])
    assert out.visual_grids == dims["visual_grids"] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for stage, width, (h, w) in zip(out.visual_stages, dims["visual_stages"], dims["visual_grids"], strict=True):
        assert stage.shape == (B, T, h * w, width)
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0  # load_balance_weight 0


def test_router_weights_and_aux_loss() -> None:
    model = AVMoEBackbone(tiny_config(adapter={"load_balance_weight": 0.5, "num_uni_experts": 2})).train()
    out = model(*_inputs())
    assert len(out.router_weights) == 4 * (2 + 2)  # 4 MoEs x 4 paired blocks (stages 0 and 2 with num_skip=2)
    for w in out.router_weights:
        assert w.shape == (B * T, 3)
        torch.testing.assert_close(w.sum(-1), torch.ones(B * T))
    expected = 0.5 * sum(load_balance_loss(w) for w in out.router_weights)
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.item() > 0


@pytest.mark.parametrize("num_skip, stages", [(1, [0, 1, 2, 3]), (2, [0, 2]), (4, [0, 1, 2])])
def test_skip_rule(num_skip: int, stages: list[int]) -> None:
    model = AVMoEBackbone(tiny_config(adapter={"num_skip": num_skip}))
    assert sorted(int(s) for s in model.adapters) == stages
    assert all(len(model.adapters[str(s)]) == 2 for s in stages)  # one position per audio block


def test_lockstep_order_in_stage_with_ratio_three() -> None:
    """Stage 2 (6 visual / 2 audio blocks): audio block k runs after the attention half of visual block 3k+2."""
    model = AVMoEBackbone(tiny_config(fast=False)).eval()  # the library modules' hooks fire on the plain path
    events: list[str] = []
    for j, blk in enumerate(model.visual_encoder.encoder.layers[2].blocks):
        blk.attention.register_forward_hook(lambda *_, j=j: events.append(f"v{j}"))
    for k, blk in enumerate(model.audio_encoder.audio_encoder.layers[2].blocks):
        blk.register_forward_hook(lambda *_, k=k: events.append(f"a{k}"))
    model(*_inputs())
    assert events == ["v0", "v1", "v2", "a0", "v3", "v4", "v5", "a1"]


@pytest.mark.parametrize("task", sorted(PAPER_CONFIGS))
def test_paper_configs_build_and_train_at_tiny_scale(task: str) -> None:
    model = AVMoEBackbone(tiny_config(adapter=paper_adapter(task))).train()
    cfg = model.config.adapter
    _open_gates(model)
    out = model(*_inputs(t=2))
    experts = cfg.num_cross_experts + cfg.num_uni_experts
    positions = sum(len(p) for p in model.adapters.values())
    assert positions == (4 if cfg.num_skip == 2 else 8)
    assert len(out.router_weights) == 4 * positions
    assert all(w.shape == (B * 2, experts) for w in out.router_weights)
    assert torch.isfinite(out.visual_tokens).all() and torch.isfinite(out.audio_tokens).all()
    assert (out.aux_loss.item() > 0) == (cfg.load_balance_weight > 0)
    (out.visual.square().mean() + out.audio.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.adapters.parameters())


def test_encoders_stay_in_eval_unless_train_mode() -> None:
    model = AVMoEBackbone(tiny_config()).train()
    assert model.training and all(m.training for m in model.adapters.modules())
    assert not any(m.training for m in model.visual_encoder.modules())
    assert not any(m.training for m in model.audio_encoder.modules())
    quirky = AVMoEBackbone(tiny_config(visual={"train_mode": True}, audio={"train_mode": True})).train()
    assert all(m.training for m in quirky.visual_encoder.modules())
    assert all(m.training for m in quirky.audio_encoder.modules())
    quirky.eval()
    assert not any(m.training for m in quirky.modules())


@pytest.mark.parametrize("audio_trainable", [False, True])
def test_modality_parameters_partition_by_ownership(audio_trainable: bool) -> None:
    model = AVMoEBackbone(tiny_config(audio={"trainable": audio_trainable}))
    groups = model.modality_parameters()
    audio, visual = {id(p) for p in groups["audio"]}, {id(p) for p in groups["visual"]}
    assert audio and visual and not audio & visual
    adapters = {id(p) for p in _adapter_params(model)}
    encoder_audio = {id(p) for p in model.audio_encoder.parameters()}
    assert audio | visual == adapters | (encoder_audio if audio_trainable else set())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == audio | visual
    position = model.adapters["0"][0]
    assert {id(p) for p in position.a1.token_map.parameters()} <= audio  # reads visual, owned by audio
    assert {id(p) for p in position.v1.token_map.parameters()} <= visual


def test_disabled_adapters_have_no_modules() -> None:
    model = AVMoEBackbone(tiny_config(adapter={"enabled": False}))
    assert len(model.adapters) == 0 and not any(p.requires_grad for p in model.parameters())
    out = model(*_inputs())
    assert out.router_weights == [] and out.aux_loss.item() == 0.0


# ------------------------------------------------------------------------------------------------ input handling
def test_video_preprocessing_float_and_resize() -> None:
    model = AVMoEBackbone(tiny_config(adapter={"enabled": False})).eval()
    video, audio = _inputs()
    as_uint8 = model(video, audio).visual_tokens
    assert torch.equal(model(video.float() / 255.0, audio).visual_tokens, as_uint8)
    big, _ = _inputs(size=72)
    assert model(big, audio).visual_tokens.shape == as_uint8.shape  # resized on the device to 64x64
    with pytest.raises(ValueError, match="audio"):
        model(video, audio[:, :2])


def test_pairing_rule_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple"):
        AVMoEBackbone(tiny_config(visual={"depths": [2, 2, 5, 2]}))


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        AVMoEBackbone(tiny_config(adapter={"enabled": False}))


# ------------------------------------------------------------------------------------------------- weight loading
def test_pretrained_folders_reproduce_in_memory_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = AVMoEBackbone(tiny_config()).eval()
    _open_gates(source)
    source.audio_encoder.audio_encoder.batch_norm.running_mean.normal_()  # saved statistics must survive
    source.visual_encoder.save_pretrained(tmp_path / "swin")
    source.audio_encoder.save_pretrained(tmp_path / "htsat")
    cfg = tiny_config(visual={"pretrained": str(tmp_path / "swin")}, audio={"pretrained": str(tmp_path / "htsat")})
    loaded = AVMoEBackbone(cfg).eval()
    loaded.adapters.load_state_dict(source.adapters.state_dict())
    video, audio = _inputs()
    expected, got = source(video, audio), loaded(video, audio)
    assert torch.equal(got.visual_tokens, expected.visual_tokens)
    assert torch.equal(got.audio_tokens, expected.audio_tokens)
    assert all(not p.requires_grad for p in loaded.visual_encoder.parameters())


def test_clap_model_folder_uses_its_audio_tower(tmp_path: Path) -> None:
    source = AVMoEBackbone(tiny_config(adapter={"enabled": False}))
    text = ClapTextConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40,
    )
    clap = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=source.audio_encoder.config.to_dict()))
    clap.audio_model.load_state_dict(source.audio_encoder.state_dict())
    clap.save_pretrained(tmp_path / "clap")
    loaded = AVMoEBackbone(tiny_config(adapter={"enabled": False}, audio={"pretrained": str(tmp_path / "clap")}))
    for key, value in source.audio_encoder.state_dict().items():
        assert torch.equal(loaded.audio_encoder.state_dict()[key], value), key
