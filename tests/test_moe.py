"""MoE adapter parts against an independent re-statement of the official code's (M, C, N, 1) Conv2d layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avmoe.models.config import AdapterConfig
from avmoe.models.moe import (
    CrossModalExpert,
    GroupedLinear,
    MoEAdapter,
    Router,
    TokenMapping,
    UnimodalExpert,
    load_balance_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

M, N, C, N2, C2 = 6, 10, 16, 7, 24  # frames, tokens/width of x, tokens/width of the other modality


# ------------------------------------------------------------------------ official layout, written from the paper code
def _conv(lin: GroupedLinear) -> nn.Conv2d:
    """The Conv2d(k=1, groups=g, bias=False) that a GroupedLinear stands for."""
    g, out_g, in_g = lin.weight.shape
    conv = nn.Conv2d(in_g * g, out_g * g, 1, groups=g, bias=False)
    conv.weight.data.copy_(lin.weight.detach().reshape(out_g * g, in_g, 1, 1))
    return conv


def _bn2d(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bn.num_features)
    out.load_state_dict(bn.state_dict())
    out.train(bn.training)
    return out


def _ln(ln: nn.LayerNorm, x: Tensor) -> Tensor:  # LayerNorm over C of an (M, C, N, 1) tensor
    return ln(x.squeeze(-1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(-1)


def _latent(tokens: Tensor, gate: Tensor, x: Tensor, src: Tensor) -> Tensor:  # x, src: (M, C, N, 1)
    rep = tokens.expand(x.shape[0], -1, -1)
    att = torch.bmm(rep, src.squeeze(-1)).softmax(-1)
    rep = rep + torch.bmm(att, src.squeeze(-1).permute(0, 2, 1))
    att = torch.bmm(x.squeeze(-1).permute(0, 2, 1), rep.permute(0, 2, 1)).softmax(-1)
    return x + gate * torch.bmm(att, rep).permute(0, 2, 1).unsqueeze(-1)


def _official_expert(expert: nn.Module, x: Tensor, vis: Tensor) -> Tensor:
    """``ExpertAdapter.forward`` of the official code on (M, C, N, 1) tensors (gate included)."""
    b = expert.bottleneck
    if isinstance(expert, CrossModalExpert):
        x = _latent(expert.fusion.tokens, expert.fusion.gate, x, vis)
    elif expert.variant == "param_free":
        xs = x.squeeze(-1)
        att = torch.bmm(xs.permute(0, 2, 1), xs).softmax(-1)
        x = x + expert.gate_av * torch.bmm(xs, att).unsqueeze(-1)
    elif expert.variant == "mha_frames":
        x = expert.mha(x.squeeze(-1).permute(0, 2, 1), x.squeeze(-1).permute(0, 2, 1), x.squeeze(-1).permute(0, 2, 1))
        x = x[0].permute(0, 2, 1).unsqueeze(-1)
    elif expert.variant == "latent":
        x = _latent(expert.self_attention.tokens, expert.self_attention.gate, x, x)
    z = _conv(b.down)(_ln(b.ln_before, x))
    z = _bn2d(b.bn_down)(z) if b.bn_down is not None else z
    z = F.relu(z) if b.activation else z
    out = _conv(b.up)(z)
    out = _bn2d(b.bn_up)(out) if b.bn_up is not None else out
    out = _ln(b.ln_post, out)
    return out if expert.gate is None else expert.gate * out


def _official_moe(moe: MoEAdapter, x: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """``MoEAdapter.forward`` of the official code; x (M, N, C), other (M, N', C') given channel-last."""
    conv = nn.Conv2d(moe.token_map.token_weight.shape[1], moe.token_map.token_weight.shape[0], 1)
    conv.weight.data.copy_(moe.token_map.token_weight.detach()[:, :, None, None])
    conv.bias.data.copy_(moe.token_map.token_bias.detach())
    x4, other4 = x.permute(0, 2, 1).unsqueeze(-1), other.permute(0, 2, 1).unsqueeze(-1)
    vis = conv(other4.transpose(2, 1))  # (M, N, C', 1)
    vis_fc = moe.token_map.fc(vis.squeeze(-1))  # (M, N, C)
    vis = vis_fc.permute(0, 2, 1).unsqueeze(-1)
    router_in = torch.cat((x.mean(1, keepdim=True), vis_fc.mean(1, keepdim=True)), dim=-1)
    probs = moe.router.mlp(router_in).softmax(-1)  # (M, 1, E)
    outs = torch.cat([_official_expert(e, x4, vis) for e in moe.experts], dim=-1)  # (M, C, N, E)
    out = (outs * probs.unsqueeze(-2)).sum(-1)  # (M, C, N)
    return out.permute(0, 2, 1), probs.squeeze(1)


def _randomise_gates(module: nn.Module) -> None:
    """Non-zero gates everywhere so that every branch contributes."""
    for name, p in module.named_parameters():
        if name.endswith("gate") or name.endswith("gate_av"):
            p.data.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_linear_equals_grouped_conv(groups: int) -> None:
    lin = GroupedLinear(16, 8, groups)
    x = torch.randn(M, N, 16)
    ref = _conv(lin)(x.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1)
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [(C2, C), (C, C2)], ids=["narrow_target", "wide_target"])
def test_token_mapping_equals_conv_then_linear(dims: tuple[int, int]) -> None:
    other_dim, dim = dims
    tm = TokenMapping(N2, N, other_dim, dim)
    other = torch.randn(M, N2, other_dim)
    conv_out = torch.einsum("nk,mkc->mnc", tm.token_weight, other) + tm.token_bias[:, None]
    torch.testing.assert_close(tm(other), tm.fc(conv_out), rtol=1e-5, atol=1e-5)


def test_router_softmax_and_noise_only_in_training() -> None:
    router = Router(2 * C, [16, 8], 3, noise_std=0.5)
    x, y = torch.randn(M, N, C), torch.randn(M, N, C)
    router.eval()
    w = router(x, y)
    assert w.shape == (M, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(M))
    torch.testing.assert_close(router(x, y), w)  # deterministic in eval
    router.train()
    assert not torch.allclose(router(x, y), w)  # noisy logits in training
    torch.testing.assert_close(router(x, y).sum(-1), torch.ones(M))


def test_load_balance_loss() -> None:
    uniform = torch.full((M, 4), 0.25)
    assert load_balance_loss(uniform).abs().item() < 1e-7
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(M, 4)
    loss = load_balance_loss(skewed)
    assert loss.item() > 0
    expected = sum(0.25 * (math.log(0.25) - math.log(p)) for p in (0.7, 0.1, 0.1, 0.1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # == KL(uniform || mean p) as torch spells it
    ref = F.kl_div(skewed.mean(0).log(), torch.full((4,), 0.25), reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


VARIANTS = ["linear", "param_free", "mha_frames", "latent"]


@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "no_bn"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moe_matches_official_layout(variant: str, use_bn: bool, training: bool) -> None:
    cfg = AdapterConfig(
        num_cross_experts=2, num_uni_experts=2, uni_expert=variant, num_latents=5, reduction=4, conv_groups=2,
        use_bn=use_bn, router_hidden=[16, 8], mha_heads=4, mha_dropout=0.0,
    )
    torch.manual_seed(0)
    moe = MoEAdapter(C, C2, N, N2, cfg, gated=True)
    _randomise_gates(moe)
    moe.train(training)
    x, other = torch.randn(M, N, C), torch.randn(M, N2, C2) * 0.1  # small: raw dot-product softmaxes stay soft
    out, w, lb = moe(x, other)
    ref, ref_w = _official_moe(moe, x, other)
    assert out.shape == (M, N, C) and w.shape == (M, 4) and lb.dim() == 0
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gated_moe_is_zero_at_init_and_ungated_is_not(variant: str) -> None:
    cfg = AdapterConfig(uni_expert=variant, num_latents=4, reduction=4, router_hidden=[8], mha_heads=2)
    x, other = torch.randn(M, N, C), torch.randn(M, N2, C2)
    out, w, _ = MoEAdapter(C, C2, N, N2, cfg, gated=True)(x, other)
    assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(M))
    out, _, _ = MoEAdapter(C, C2, N, N2, cfg, gated=False)(x, other)
    assert out.abs().sum() > 0


def test_gradients_reach_zero_gates() -> None:
    moe = MoEAdapter(C, C2, N, N2, AdapterConfig(num_latents=4, reduction=4, router_hidden=[8]), gated=True)
    out, _, _ = moe(torch.randn(M, N, C), torch.randn(M, N2, C2))
    (out * torch.randn_like(out)).sum().backward()
    for expert in moe.experts:
        assert expert.gate.grad is not None and expert.gate.grad.abs().item() > 0


def test_mha_frames_attends_across_frames_only() -> None:
    """The S4 quirk: token n of frame 0 depends on token n of other frames, not on other tokens of frame 0."""
    cfg = AdapterConfig(uni_expert="mha_frames", reduction=4, mha_heads=2, mha_dropout=0.0, use_bn=False)
    expert = UnimodalExpert(C, cfg, gated=False).eval()
    x = torch.randn(M, N, C)
    base = expert._pre(x)
    other_frame = x.clone()
    other_frame[1, 3] += 1.0
    changed = (expert._pre(other_frame) - base).abs().sum(-1)  # (M, N)
    assert changed[0, 3] > 0  # same token, other frame: attended
    same_frame = x.clone()
    same_frame[0, 5] += 1.0
    changed = (expert._pre(same_frame) - base).abs().sum(-1)
    assert changed[0, 3] == 0  # other token, same frame: not attended


@pytest.mark.parametrize("variant", ["param_free", "latent"])
def test_pre_step_is_identity_with_zero_gate(variant: str) -> None:
    expert = UnimodalExpert(C, AdapterConfig(uni_expert=variant, num_latents=4, reduction=4), gated=False)
    x = torch.randn(M, N, C)
    assert torch.equal(expert._pre(x), x)


def test_bad_group_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="conv_groups"):
        GroupedLinear(16, 6, 4)
