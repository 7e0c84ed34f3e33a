"""The frozen-weight GEMM (``models/backbones/gemm.py``): oneDNN exactly where it computes what ``F.linear`` does,
with the same value and input gradient, and plain ``F.linear`` everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avmoe.models import AVMoEBackbone
from avmoe.models.backbones.gemm import choose, frozen_linear, mlp, mm, onednn_applies
from avmoe.models.moe import MoEAdapter
from avmoe.models.moe_factored import factoring_pays
from avmoe.models.presets import tiny_config
from tests.test_fast_paths import _inputs, _pair, _task_backbone

pytestmark = [pytest.mark.filterwarnings("ignore:.*RANDOM weights"),
              pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN"),  # torch's mkldnn.flags()
              pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")]

ONEDNN_OP = "mkldnn::_linear_pointwise"


def _ops(fn) -> dict[str, int]:
    """Call counts of the operators torch dispatched while running ``fn``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("layout", ["contiguous", "transposed_input", "no_bias"])
def test_frozen_linear_equals_f_linear_in_value_and_input_gradient(layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 7, 48, generator=g)  # (B, H, W, K): the window-attention layout
    if layout == "transposed_input":
        x = x.transpose(1, 2)
    weight, bias = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    if layout == "no_bias":
        bias = None
    cotangent = torch.randn(*x.shape[:-1], 40, generator=g)
    results = []
    for fn in (F.linear, frozen_linear):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, weight, bias)
        out.backward(cotangent)
        results.append((out.detach(), leaf.grad))
    assert onednn_applies(x, weight, bias)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(results[1][1], torch.zeros_like(results[1][1]))


def test_frozen_linear_takes_onednn_forward_and_backward() -> None:
    x, weight = torch.randn(64, 32, requires_grad=True), torch.randn(16, 32)
    counts = _ops(lambda: frozen_linear(x, weight, None).sum().backward())
    assert counts.get(ONEDNN_OP) == 2, counts  # forward product and input-gradient product
    assert "aten::addmm" not in counts and "aten::mm" not in counts, counts


def test_trainable_weight_gets_its_gradient_through_plain_linear() -> None:
    x = torch.randn(8, 12)
    weight, bias = torch.randn(6, 12, requires_grad=True), torch.randn(6, requires_grad=True)
    assert not onednn_applies(x, weight, bias)
    counts = _ops(lambda: frozen_linear(x, weight, bias).square().sum().backward())
    assert ONEDNN_OP not in counts, counts
    expected = torch.autograd.grad(F.linear(x, weight, bias).square().sum(), weight)[0]
    torch.testing.assert_close(weight.grad, expected)


def test_cpu_autocast_and_other_dtypes_keep_f_linear() -> None:
    x, weight, bias = torch.randn(8, 12), torch.randn(6, 12), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(x, weight, bias)
        out = frozen_linear(x, weight, bias)
        assert out.dtype == torch.bfloat16  # what F.linear gives under autocast
        torch.testing.assert_close(out, F.linear(x, weight, bias))
    assert not onednn_applies(x.double(), weight.double(), bias.double())
    assert not onednn_applies(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert onednn_applies(x, weight, bias)  # outside autocast it applies again


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "default_blas"])
def test_fast_backbone_gemms_follow_the_switch(onednn: bool) -> None:
    torch.manual_seed(0)
    model = AVMoEBackbone(tiny_config()).train()
    model.onednn_gemm = onednn
    assert choose(onednn) is (frozen_linear if onednn else F.linear)
    video, audio = torch.rand(1, 2, 3, 64, 64), torch.randn(1, 2, 101, 32)
    with torch.no_grad():
        inference = _ops(lambda: model(video, audio))
    training = _ops(lambda: model(video, audio).visual_tokens.square().mean().backward())
    if not onednn:
        assert ONEDNN_OP not in inference and ONEDNN_OP not in training
        return
    blocks = sum(len(stage.blocks) for enc in (model._vstages, model._astages) for stage in enc)  # 12 + 8
    factored = sum(factoring_pays(m) for m in model.modules() if isinstance(m, MoEAdapter))
    assert factored > 0
    # no grad: q/k/v, output projection, MLP in (its GELU fused) and out of every block, and the two token-mixing
    # products of every factored MoE module
    assert inference[ONEDNN_OP] == 4 * blocks + 2 * factored
    assert "aten::gelu" not in inference
    # training: the frozen GEMMs forward and their input gradients; the trainable token mixing stays on the BLAS
    assert training[ONEDNN_OP] > 4 * blocks and training.get("aten::gelu", 0) > 0


@pytest.mark.parametrize("task", ["ave", "avvp", "avs_s4", "avs_ms3", "avqa"])
def test_fast_inference_through_onednn_equals_plain(task: str) -> None:
    plain, fast = _pair(tiny_config(**_task_backbone(task)))
    video, audio = _inputs()
    outputs = []
    for model in (plain, fast):
        model.eval()
        with torch.no_grad():
            out = model(video, audio)
        outputs.append([*out.visual_stages, out.audio_tokens, *out.router_weights])
    assert fast.onednn_gemm
    for ref, got in zip(*outputs, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mm_takes_onednn_only_without_gradient_and_for_row_major_operands() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 30, generator=g), torch.randn(30, 20, generator=g)
    torch.testing.assert_close(mm(a, b), a @ b, rtol=1e-5, atol=1e-5)
    assert _ops(lambda: mm(a, b)).get(ONEDNN_OP) == 1
    assert ONEDNN_OP not in _ops(lambda: mm(a.t().contiguous().t(), b))  # column-major a: the BLAS
    trainable = b.clone().requires_grad_()
    assert ONEDNN_OP not in _ops(lambda: mm(a, trainable).sum().backward())
    torch.testing.assert_close(trainable.grad, a.sum(0)[:, None].expand(30, 20))
    with torch.no_grad():
        assert _ops(lambda: mm(a, trainable)).get(ONEDNN_OP) == 1


def test_mlp_fuses_only_the_exact_gelu_and_only_without_gradient() -> None:
    from transformers import Swinv2Config, Swinv2Model

    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=4)
    layer = Swinv2Model(cfg).eval().encoder.layers[0].blocks[0]
    x = torch.randn(2, 16, 8)
    expected = layer.output(layer.intermediate(x))
    with torch.no_grad():
        fused = _ops(lambda: mlp(layer, x, frozen_linear))
        torch.testing.assert_close(mlp(layer, x, frozen_linear), expected)
    assert "aten::gelu" not in fused and fused[ONEDNN_OP] == 2
    leaf = x.clone().requires_grad_()
    assert _ops(lambda: mlp(layer, leaf, frozen_linear)).get("aten::gelu") == 1  # backward needs the pre-activation
    cfg_tanh = Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=4,
                            hidden_act="gelu_new")
    tanh_layer = Swinv2Model(cfg_tanh).eval().encoder.layers[0].blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(mlp(tanh_layer, x, frozen_linear), tanh_layer.output(tanh_layer.intermediate(x)))


def test_switching_onednn_off_in_torch_is_respected() -> None:
    x, weight = torch.randn(8, 12), torch.randn(6, 12)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_applies(x, weight, None)
        assert ONEDNN_OP not in _ops(lambda: frozen_linear(x, weight))
    assert onednn_applies(x, weight, None)
