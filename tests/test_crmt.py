"""CRMT components against transcriptions of the official code (GeWu-Lab/Certifiable-Robust-Multi-modal-Training)."""

from __future__ import annotations

import pytest
import torch

from avmoe.models.crmt import (OrthogonalFusion, certified_bound, crmt_at_inputs, lipschitz_constants, margin_loss,
                               orthogonal_rows, stage2_loss)


def official_ownnorm(weight: torch.Tensor, norm_groups: int) -> torch.Tensor:
    """``models/fusion_model.py`` ``OWNNorm.forward`` (transcribed)."""
    z = weight.view(norm_groups, weight.shape[0] // norm_groups, -1)
    zc = z - z.mean(dim=-1, keepdim=True)
    s = torch.matmul(zc, zc.transpose(1, 2))
    wm = torch.randn(s.shape).to(s)
    for i in range(norm_groups):
        u, eig, _ = s[i].svd()
        wm[i] = u.mm(eig.rsqrt().diag()).mm(u.t())
    return wm.matmul(zc).view_as(weight)


def official_margin(outs, labels, rho):
    """``train.py`` ``train_CRMT_JT`` margin term (transcribed)."""
    rows = torch.arange(len(labels))
    m = 0.0
    for out in outs:
        m = m + (torch.sum(torch.exp(out), dim=1) * torch.exp(-out[rows, labels]) - 1)
    return torch.mean(torch.log(m + 1e-5)) * rho


def test_orthogonal_rows_equal_the_official_ownnorm():
    w = torch.randn(5, 12, dtype=torch.float64)
    assert torch.allclose(orthogonal_rows(w), official_ownnorm(w, norm_groups=5), atol=1e-10)


def test_fusion_forward_matches_the_official_layer():
    torch.manual_seed(0)
    fusion = OrthogonalFusion({"visual": 6, "audio": 4}, num_classes=3).double()
    fusion.a["audio"].data = torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64)
    v, a = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    uni, fused = fusion({"visual": v, "audio": a})
    w = fusion.fc.weight
    h_v = v @ official_ownnorm(w[:, :6], 3).t()
    h_a = a @ official_ownnorm(w[:, 6:], 3).t()
    assert torch.allclose(uni["visual"], h_v) and torch.allclose(uni["audio"], h_a)
    assert torch.allclose(fused, h_v * fusion.a["visual"] + h_a * fusion.a["audio"] + fusion.fc.bias)


def test_margin_loss_equals_the_official_term_and_is_stable():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    mine = margin_loss({"v": outs[0], "a": outs[1]}, labels, rho=2.0)
    assert float(mine) == pytest.approx(float(official_margin(outs, labels, 2.0)), rel=1e-6)
    big = [o.float() * 200 for o in outs]  # exp(200) overflows float32 in the official form
    assert torch.isfinite(margin_loss({"v": big[0], "a": big[1]}, labels))


def test_certified_bound_and_stage2_loss():
    g = torch.Generator().manual_seed(1)
    uni = {"v": torch.randn(6, 4, generator=g), "a": torch.randn(6, 4, generator=g)}
    a = {"v": torch.rand(4, generator=g) + 0.1, "a": torch.rand(4, generator=g) + 0.1}
    b = torch.randn(4, generator=g)
    lip = {"v": torch.rand(4, generator=g) + 0.5, "a": torch.rand(4, generator=g) + 0.5}
    fused = a["v"] * uni["v"] + a["a"] * uni["a"] + b
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    r = certified_bound(uni, fused, labels, a, b, lip)
    # the_second_step's runner-up: the fused output with the label masked to -inf, argmax (checked by hand here)
    for i in range(6):
        y = int(labels[i])
        j = max((k for k in range(4) if k != y), key=lambda k: float(fused[i, k]))
        num = sum(a[m][y] * uni[m][i, y] - a[m][j] * uni[m][i, j] for m in uni) + b[y] - b[j]
        den = torch.sqrt(sum((a[m][y] * lip[m][y] + a[m][j] * lip[m][j]) ** 2 for m in uni))
        assert float(r[i]) == pytest.approx(float(num / den), rel=1e-5)
    correct = fused.argmax(1) == labels
    assert ((r > 0) == correct).all()  # positive exactly on correctly classified samples (fused margin > 0)
    a_train = {m: v.clone().requires_grad_(True) for m, v in a.items()}
    loss = stage2_loss(uni, fused, labels, a_train, b, lip)
    loss.backward()
    assert float(loss) == pytest.approx(-float(r.detach().mean()), rel=1e-5) and a_train["v"].grad is not None


def test_lipschitz_of_the_fusion_in_its_features_is_the_integration_weight():
    fusion = OrthogonalFusion({"visual": 6, "audio": 4}, num_classes=3)
    feats = {"visual": torch.randn(5, 6), "audio": torch.randn(5, 4)}
    lip = lipschitz_constants(lambda x: fusion(x)[1], feats, 3)
    # d fused_k / d phi^m = a^m_k W~^m_k, a unit row times a^m_k
    assert torch.allclose(lip["audio"], fusion.a["audio"].detach().abs(), atol=1e-6)
    assert torch.allclose(lip["visual"], fusion.a["visual"].detach().abs(), atol=1e-6)


def test_crmt_at_inputs_raise_the_loss_within_the_box():
    torch.manual_seed(0)
    fusion = OrthogonalFusion({"visual": 6, "audio": 4}, num_classes=3)
    fusion.a["audio"].data.fill_(2.0)
    fusion.a["visual"].data.fill_(2.0)
    feats = {"visual": torch.randn(8, 6), "audio": torch.randn(8, 4)}
    labels = torch.arange(8) % 3

    def loss(x):
        return torch.nn.functional.cross_entropy(fusion(x)[1], labels)

    adv = crmt_at_inputs(loss, feats, eps=0.1)
    for m in feats:
        assert (adv[m] - feats[m]).abs().max() <= 0.2 + 1e-6
    assert float(loss(adv)) > float(loss(feats))
