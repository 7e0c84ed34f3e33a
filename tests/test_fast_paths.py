"""The fast paths equal the plain ones: fused window attention vs the library blocks, batched MoE experts vs the
experts one by one, the fast backbone vs the plain backbone for every paper config, cached frozen constants
invalidated when they must be, compile fallback."""

from __future__ import annotations

import copy
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from avmoe.models import AVMoEBackbone, tiny_config
from avmoe.models.backbones import htsat, swin
from avmoe.models.backbones.windows import FrozenCache
from avmoe.models.compile import RegionalCompile
from avmoe.models.config import AdapterConfig
from avmoe.models.moe import MoEAdapter
from avmoe.models.moe_batched import batched_moe_forward
from avmoe.models.moe_factored import factoring_pays
from avmoe.models.presets import paper_adapter

pytestmark = [pytest.mark.filterwarnings("ignore:.*RANDOM weights"), pytest.mark.usefixtures("one_thread")]

CONFIGS = Path(__file__).resolve().parent.parent / "lightning_configs"
PAPER_TASKS = ["ave", "avvp", "avs_s4", "avs_ms3", "avqa"]
# Encoder fields of a task config that are behaviour, not size (sizes stay tiny here).
BEHAVIOUR = ("trainable", "train_mode", "mixup_alpha", "mixup_partner")


def _task_backbone(task: str) -> dict:
    """The backbone section of ``lightning_configs/<task>.yaml`` reduced to adapter + encoder behaviour."""
    section = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())["model"]["init_args"]["backbone"]
    out = {"adapter": section["adapter"]}
    for enc in ("visual", "audio"):
        out[enc] = {k: v for k, v in section.get(enc, {}).items() if k in BEHAVIOUR}
    return out


def _perturb_encoders(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial frozen constants: logit scales up to the clamp, larger position-bias MLPs and tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 4.6)
            elif "continuous_position_bias_mlp" in name or "relative_position_bias_table" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(0.5))


def _inputs(b: int = 2, t: int = 3, size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, size, size, generator=g), torch.randn(b, t, 101, 32, generator=g)


def _pair(cfg, seed: int = 0) -> tuple[AVMoEBackbone, AVMoEBackbone]:
    """(plain, fast) backbones with the same weights (open gates, perturbed frozen constants)."""
    torch.manual_seed(seed)
    fast = AVMoEBackbone(cfg)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if name.endswith("gate") or name.endswith("gate_av"):
                p.fill_(0.5)
    _perturb_encoders(fast, seed)
    plain = copy.deepcopy(fast)
    plain.config = copy.deepcopy(cfg)
    plain.config.fast = False
    assert fast.config.fast
    return plain, fast


def _step(model: AVMoEBackbone, video: Tensor, audio: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Train-mode forward + backward: the compared outputs and every gradient."""
    model.train()
    torch.manual_seed(1)  # same router noise / mixup draws on both paths
    out = model(video, audio)
    loss = sum(s.square().mean() for s in out.visual_stages) + out.audio_tokens.square().mean() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [*out.visual_stages, out.audio_tokens, *out.router_weights], grads


def _assert_same(a: list[Tensor], b: list[Tensor], ga: dict[str, Tensor], gb: dict[str, Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert ga.keys() == gb.keys() and ga
    scale = max(g.abs().max() for g in ga.values())  # grads of BN-cancelled biases are rounding noise: absolute
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=5e-4 * float(scale), msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------- per-block exactness
@pytest.mark.parametrize("image_size", [64, 72], ids=["divisible", "padded"])
def test_swin_fast_attention_equals_library(image_size: int) -> None:
    cfg = tiny_config(visual={"image_size": image_size}).visual
    model = swin.build_swin(cfg).eval().requires_grad_(False)
    _perturb_encoders(model)
    cache = FrozenCache()
    x, hw = swin.embed(model, torch.randn(3, 3, image_size, image_size))
    seen = set()
    for stage in model.encoder.layers:
        for layer in stage.blocks:
            ref = swin.attn_half(layer, x, hw)
            torch.testing.assert_close(swin.attn_half_fast(layer, x, hw, cache), ref, rtol=1e-5, atol=1e-5)
            seen.add((layer.shift_size > 0, hw[0] % layer.window_size > 0))
            x = swin.mlp_half(layer, ref)
        x, hw = swin.downsample(stage, x, hw)
    assert any(s for s, _ in seen) and (image_size == 64 or any(p for _, p in seen))  # shifted, padded blocks ran


def test_htsat_fast_block_equals_library() -> None:
    model = htsat.build_htsat(tiny_config().audio).eval().requires_grad_(False)
    _perturb_encoders(model)
    cache = FrozenCache()
    x, hw = htsat.embed(model, torch.randn(4, 1, 101, 32))
    for stage in model.audio_encoder.layers:
        for layer in stage.blocks:
            ref = htsat.block(layer, x, hw)
            torch.testing.assert_close(htsat.block_fast(layer, x, hw, cache), ref, rtol=1e-5, atol=1e-5)
            x = ref
        x, hw = htsat.downsample(stage, x, hw)
    assert len(cache) > 0


def _sdpa_kernels(fn) -> set[str]:
    """Names of the SDPA kernels torch dispatched to while running ``fn`` (forward + backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_fast_backbone_attention_takes_the_fused_cpu_kernel() -> None:
    # A 3-D attn_mask sends CPU SDPA to the unfused math path (explicit softmax + bmm), several times slower
    # at the paper's window shapes; the cached masks are 4-D so that the fused kernel runs (fwd and bwd).
    _, fast = _pair(tiny_config())
    video, audio = _inputs(b=1)
    kernels = _sdpa_kernels(lambda: _step(fast, video, audio))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels


def _bf16_errors(library, fast, x: Tensor) -> tuple[float, float]:
    """Errors of one block under CPU bf16 autocast, library vs fast, against the library in fp32, relative to the
    block's fp32 update (so that the residual does not hide the attention)."""
    ref = library(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = library(x).float(), fast(x).float()
    return tuple(float((g - ref).norm() / (ref - x).norm()) for g in got)


def test_fast_blocks_under_cpu_bf16_autocast_are_as_close_to_fp32_as_the_library() -> None:
    # Under CPU bf16 autocast the fast path runs two bf16 GEMMs around fp32 scores (torch's fused CPU kernel is
    # several times slower there): scale, bias + mask and softmax in fp32 as the library does, so each block is
    # as close to the fp32 result as the library's own bf16 block.
    torch.manual_seed(0)
    cache = FrozenCache()
    vis = swin.build_swin(tiny_config().visual).eval().requires_grad_(False)
    aud = htsat.build_htsat(tiny_config().audio).eval().requires_grad_(False)
    _perturb_encoders(vis)
    _perturb_encoders(aud)
    x, hw = swin.embed(vis, torch.randn(3, 3, 64, 64))
    errors = []
    for stage in vis.encoder.layers:
        for layer in stage.blocks:
            errors.append(_bf16_errors(lambda t: swin.attn_half(layer, t, hw),
                                       lambda t: swin.attn_half_fast(layer, t, hw, cache), x))
            x = swin.mlp_half(layer, swin.attn_half(layer, x, hw))
        x, hw = swin.downsample(stage, x, hw)
    x, hw = htsat.embed(aud, torch.randn(4, 1, 101, 32))
    for stage in aud.audio_encoder.layers:
        for layer in stage.blocks:
            errors.append(_bf16_errors(lambda t: htsat.block(layer, t, hw),
                                       lambda t: htsat.block_fast(layer, t, hw, cache), x))
            x = htsat.block(layer, x, hw)
        x, hw = htsat.downsample(stage, x, hw)
    for library, fast in errors:
        assert 0 < library < 0.05 and fast < 1.25 * library + 1e-3, errors


def test_fast_backbone_under_cpu_bf16_autocast_skips_the_fused_kernel() -> None:
    _, fast = _pair(tiny_config())
    video, audio = _inputs(b=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = _sdpa_kernels(lambda: _step(fast, video, audio))
    assert not kernels, kernels


# ------------------------------------------------------------------------------ batched experts, every paper config
def _adapter_step(module: MoEAdapter, fn, x: Tensor, other: Tensor, cotangent: Tensor) -> tuple[list[Tensor], dict]:
    """Forward + backward of one adapter: outputs, router weights, lb loss, every gradient, BN running stats."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # same router noise on both computations
    out, weights, lb = fn(module, x, other)
    (out * cotangent).sum().add(weights.square().sum() + lb).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [out, weights, lb, *[b.clone() for b in module.buffers()]], grads


@pytest.mark.parametrize("factor", [False, True], ids=["materialised", "factored"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("task", PAPER_TASKS)
def test_batched_experts_equal_experts_one_by_one(task: str, train: bool, factor: bool) -> None:
    cfg = AdapterConfig(**_task_backbone(task)["adapter"])
    torch.manual_seed(0)
    batched = MoEAdapter(32, 24, 12, 20, cfg, gated=True).train(train)  # dim, other dim, tokens, other tokens
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open gates, non-trivial LayerNorm affines and BN running statistics
        for name, p in batched.named_parameters():
            if name.endswith("gate") or name.endswith("gate_av"):
                p.fill_(0.5)
            elif "ln_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in batched.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                b.add_(torch.rand(b.shape, generator=g))
    plain = copy.deepcopy(batched)
    x, other, cotangent = torch.randn(6, 12, 32, generator=g), torch.randn(6, 20, 24, generator=g), \
        torch.randn(6, 12, 32, generator=g)
    out_plain, grads_plain = _adapter_step(plain, lambda m, a, b: m(a, b), x, other, cotangent)
    out_batched, grads_batched = _adapter_step(batched, partial(batched_moe_forward, factor=factor), x, other,
                                               cotangent)
    for ref, got in zip(out_plain, out_batched, strict=True):  # incl. BN running stats (per expert)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert grads_plain.keys() == grads_batched.keys() == {n for n, _ in plain.named_parameters()}
    for name in grads_plain:
        torch.testing.assert_close(grads_batched[name], grads_plain[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert batched.state_dict().keys() == plain.state_dict().keys()


def _mixing_flops(module: MoEAdapter, x: Tensor, other: Tensor, factor: bool) -> tuple[int, int]:
    """(total FLOPs of a forward, calls of TokenMapping.forward) for the batched experts, factored or not."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    hook = module.token_map.register_forward_hook(lambda *_: calls.append(1))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        batched_moe_forward(module, x, other, factor=factor)
    hook.remove()
    return counter.get_total_flops(), len(calls)


@pytest.mark.parametrize("task, dims, pays", [
    ("ave", (192, 96), True),  # Swin stage 0 <- HTS-AT stage 0 at paper width: 2 x 32 latents < 96
    ("ave", (96, 192), True),  # the audio side of the same position
    ("avqa", (192, 96), True),  # 2 latents
    ("avs_ms3", (192, 96), False),  # two cross-modal experts: 2 x 64 latent columns > 96
    ("ave", (48, 32), False),  # narrower than the latents: materialising y is cheaper
])
def test_factored_token_map_is_chosen_where_it_saves_flops(task: str, dims: tuple[int, int], pays: bool) -> None:
    """The automatic choice (``factor=None``) follows the FLOP count: the factored read never materialises y,
    and wherever it is chosen it runs fewer FLOPs than materialising y (measured by torch's FLOP counter)."""
    module = MoEAdapter(dims[0], dims[1], 96, 160, paper_adapter(task), gated=True).eval()
    assert factoring_pays(module) is pays
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(2, 96, dims[0], generator=g), torch.randn(2, 160, dims[1], generator=g)
    flops_y, calls_y = _mixing_flops(module, x, other, factor=False)
    flops_f, calls_f = _mixing_flops(module, x, other, factor=True)
    assert (calls_y, calls_f) == (1, 0)
    assert (flops_f < flops_y) is pays, (flops_f, flops_y)


def test_fast_backbone_runs_the_batched_experts() -> None:
    plain, fast = _pair(tiny_config())
    calls = {"plain": 0, "batched": 0}
    for key, unit in (("plain", fast._compiled["moe_adapter"]), ("batched", fast._compiled["moe_adapter.batched"])):
        def counted(*args, _fn=unit.fn, _key=key):
            calls[_key] += 1
            return _fn(*args)
        unit.fn = counted
    video, audio = _inputs(b=1)
    fast.eval()
    with torch.no_grad():
        fast(video, audio)
        assert calls["batched"] > 0 and calls["plain"] == 0
        fast.batch_experts = False  # fast attention alone (the bench's "+fast attention" row)
        fast(video, audio)
    assert calls["plain"] == calls["batched"]


# --------------------------------------------------------------------------------- backbone, every paper config
@pytest.mark.parametrize("factor", [None, True], ids=["auto", "factored"])
@pytest.mark.parametrize("task", PAPER_TASKS)
def test_fast_backbone_equals_plain_for_paper_config(task: str, factor) -> None:
    plain, fast = _pair(tiny_config(**_task_backbone(task)))
    fast.factor_token_map = factor  # auto: only AVQA's 2 latents factor at the tiny width 32
    video, audio = _inputs()
    out_plain, grads_plain = _step(plain, video, audio)
    out_fast, grads_fast = _step(fast, video, audio)
    _assert_same(out_plain, out_fast, grads_plain, grads_fast)
    assert any(n.startswith("adapters.") for n in grads_fast)


def test_fast_plain_visual_encoding_equals_library() -> None:
    plain, fast = _pair(tiny_config())
    video, _ = _inputs()
    torch.testing.assert_close(fast.encode_visual_plain(video), plain.encode_visual_plain(video), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------- cache invalidation
def test_cache_is_reused_then_cleared_when_weights_load() -> None:
    plain, fast = _pair(tiny_config())
    video, audio = _inputs(b=1)
    fast.eval()
    with torch.no_grad():
        fast(video, audio)
        filled = len(fast._frozen_cache)
        fast(video, audio)
    assert filled > 0 and len(fast._frozen_cache) == filled  # built once, reused
    # New frozen encoder weights through the public loading path: the cached masks must not survive.
    _perturb_encoders(plain, seed=7)
    fast.load_state_dict(plain.state_dict())
    assert len(fast._frozen_cache) == 0
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(video, audio).visual_tokens, plain(video, audio).visual_tokens,
                                   rtol=1e-4, atol=1e-4)


def test_trainable_encoders_rebuild_constants_with_gradients() -> None:
    cfg = tiny_config(visual={"trainable": True}, audio={"trainable": True})
    plain, fast = _pair(cfg)
    video, audio = _inputs(b=1)
    out_plain, grads_plain = _step(plain, video, audio)
    out_fast, grads_fast = _step(fast, video, audio)
    assert len(fast._frozen_cache) == 0  # nothing derived from trainable weights is cached
    for key in ("continuous_position_bias_mlp.0.weight", "relative_position_bias_table", "attention.self.query.weight"):
        assert any(key in n for n in grads_fast), key
    _assert_same(out_plain, out_fast, grads_plain, grads_fast)


# ------------------------------------------------------------------------------------------------------ compile
def test_compile_unsupported_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args, **kwargs):
        raise RuntimeError("no compiler toolchain")

    monkeypatch.setattr(torch, "compile", unsupported)
    plain, fast = _pair(tiny_config(compile=True))
    video, audio = _inputs(b=1)
    plain.eval()
    fast.eval()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="unsupported here"):
        out = fast(video, audio).visual_tokens
    with torch.no_grad():
        torch.testing.assert_close(out, plain(video, audio).visual_tokens, rtol=1e-4, atol=1e-4)
    used = [unit for name, unit in fast._compiled.items() if name != "moe_adapter"]  # experts one by one: plain path
    assert used and not any(unit.enabled for unit in used)
    assert fast.compile_seconds == 0.0


def test_compiled_call_failure_runs_eagerly_and_real_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def backend_failure(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("backend compiler failed")
        return compiled

    monkeypatch.setattr(torch, "compile", backend_failure)
    unit = RegionalCompile(lambda x: x * 2, True, "double")
    with pytest.warns(RuntimeWarning, match="double"):
        assert torch.equal(unit(torch.ones(2)), torch.full((2,), 2.0))
    assert not unit.enabled
    broken = RegionalCompile(lambda x: x @ x, True, "matmul")  # fails eagerly too: the real error surfaces
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        broken(torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_backbone_bf16_and_compile_on_gpu() -> None:
    plain, fast = _pair(tiny_config(compile=True))
    plain, fast = plain.cuda().eval(), fast.cuda().eval()
    video, audio = (t.cuda() for t in _inputs())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = plain(video, audio).visual_tokens.float()
        out = fast(video, audio).visual_tokens.float()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
    if not any(unit.enabled for unit in fast._compiled.values()):
        pytest.skip("torch.compile is unsupported on this machine (fell back to eager, outputs checked)")
    assert fast.compile_seconds > 0
