"""Corrections of the wave-1 callbacks, each against a transcription of the authors' step (tests only).

Sources: ``GeWu-Lab/OGM-GE_CVPR2022`` 343dc1d ``main.py`` (train_epoch), ``GeWu-Lab/BML_TPAMI2024`` 4b3aa4f
``code/models/Classifier.py`` (``custom_autograd``, ``calcu_q``, ``Modality_drop.execute_drop``) and
``code/main.py``, ``GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation`` 7ed12b0
``code/datasets/dataloader.py`` (``AV_KS_Dataset_sample_level``) and ``code/modality_level.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from avmoe.callbacks import OGM, OGMGE, OPM
from avmoe.callbacks.opm import opm_theta
from avmoe.callbacks.valuation import modality_level_plan, sample_level_copies
from avmoe.tasks.base import UnimodalConfig
from tests.test_unimodal import build


# ------------------------------------------------------------------------- 1. split head, b / 2
def test_split_mode_is_the_official_half_bias_slice_of_the_fusion_layer():
    """OGM-GE ``main.py`` concat branch: ``out_a = mm(a, W[:, :d/2].T) + b/2`` at the linear fusion layer."""
    task, batch = build("avqa", UnimodalConfig(mode="split"))
    task.eval()
    head = task.head
    seen = {}
    hooks = [head.fusion.register_forward_hook(lambda m, i, o: seen.update(x=i[0])),
             head.question_encoder.register_forward_hook(lambda m, i, o: seen.update(q=o))]
    with torch.no_grad():
        feats = task.encode(batch)
        task.head_forward(feats, batch)  # fused forward: the fusion input [a; v] and the question embedding
        for h in hooks:
            h.remove()
        uni = task.unimodal_outputs(feats, batch)
        zero = task.unimodal_outputs(feats, batch, mode="zero")
    x, q = seen["x"], seen["q"]
    half = head.fusion.weight.size(1) // 2
    w, b = head.fusion.weight, head.fusion.bias
    official = {"audio": torch.mm(x[:, :half], w[:, :half].T) + b / 2,
                "visual": torch.mm(x[:, half:], w[:, half:].T) + b / 2}
    for m in ("audio", "visual"):
        expected = head.classifier(torch.tanh(official[m] * q))
        torch.testing.assert_close(uni[m]["answer_logits"], expected)
        assert not torch.allclose(uni[m]["answer_logits"], zero[m]["answer_logits"]), "zero passes the full bias"


def test_split_mode_names_itself_on_heads_without_a_linear_fusion():
    task, batch = build("ave", UnimodalConfig(mode="split"))
    with pytest.raises(ValueError, match="unimodal.mode: split"):
        task.unimodal_outputs(task.encode(batch), batch)


# ------------------------------------------------------------------------- 2. OGM that selects nothing
def test_ogm_selecting_no_tensor_is_an_error_at_fit_start():
    task, _ = build("ave", UnimodalConfig())
    assert not any(p.dim() >= 4 for ps in task.modality_parameters().values() for p in ps)
    with pytest.raises(ValueError, match=r"min_param_dim=4\) selects no audio tensor"):
        OGMGE(min_param_dim=4).on_fit_start(None, task)
    OGMGE(min_param_dim=2).on_fit_start(None, task)  # weight matrices: fine


# ------------------------------------------------------------------------- 3. journal OGM default, 6. tie
def test_journal_ogm_runs_ge_noise_by_default_and_the_tie_is_documented():
    assert OGM().noise, "scripts/train_ogm.sh passes no --modulation: the default OGM_GE"
    assert not OGM(noise=False).noise
    assert "tie" in OGMGE.__doc__ and "journal code visual" in OGMGE.__doc__


# ------------------------------------------------------------------------- 4. OPM theta gradient, warm-up
class OfficialCustomAutograd(torch.autograd.Function):
    """``custom_autograd`` of BML ``Classifier.py``: the gradient of theta is theta itself."""

    @staticmethod
    def forward(ctx, input, theta):
        ctx.save_for_backward(input, theta)
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        input, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), theta


def official_calcu_q(performance_1, performance_2, q_base, fix_lambda):
    q = torch.tensor([0.0, 0.0])
    ratio_1 = torch.tanh(torch.relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(torch.relu(performance_2 / performance_1 - 1))
    q[0] = q_base * (1 + fix_lambda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + fix_lambda * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def _official_feature_grads(f1, f2, w, b, label, q_base=0.5, lam=0.5):
    """The official forward (no sample dropped) and ``out.sum()`` backward: gradients of the features."""
    f1, f2 = f1.clone().requires_grad_(), f2.clone().requires_grad_()
    t1 = torch.mm(f1, w[:, :f1.shape[1]].T) + b / 2
    t2 = torch.mm(f2, w[:, f1.shape[1]:].T) + b / 2
    p1 = sum(torch.softmax(t1, 1)[i][label[i]] for i in range(len(label)))
    p2 = sum(torch.softmax(t2, 1)[i][label[i]] for i in range(len(label)))
    q = official_calcu_q(p1, p2, q_base, lam)
    d = torch.tensor([f1.shape[1], f2.shape[1]])
    theta = sum(d * q) / sum(d)
    out = OfficialCustomAutograd.apply(torch.stack([f1, f2]), theta)
    out.sum().backward()
    return f1.grad, f2.grad, theta.detach(), (p1, p2)


def test_opm_theta_and_its_official_gradient():
    gen = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(5, 6, generator=gen) * 2, torch.randn(5, 6, generator=gen) * 0.2
    w, b, label = torch.randn(3, 12, generator=gen), torch.randn(3, generator=gen), torch.tensor([0, 1, 2, 0, 1])
    g1, g2, theta, _ = _official_feature_grads(f1, f2, w, b, label)
    plain = 1 / (1 - float(theta))  # the rescaling's own gradient of out.sum()
    a, v = f1.clone().requires_grad_(), f2.clone().requires_grad_()
    s_a = torch.softmax(torch.mm(a, w[:, :6].T) + b / 2, 1)[torch.arange(5), label].sum()
    s_v = torch.softmax(torch.mm(v, w[:, 6:].T) + b / 2, 1)[torch.arange(5), label].sum()
    ours = opm_theta(s_a, s_v, 0.5, 0.5, 6, 6)
    assert float(ours) == pytest.approx(float(theta)) and float(theta) > 0
    extra = torch.autograd.grad(ours, [a, v], grad_outputs=ours.detach())  # theta * d(theta)/d(features)
    torch.testing.assert_close(g1, plain + extra[0])
    torch.testing.assert_close(g2, plain + extra[1])
    assert extra[0].abs().max() > 1e-4, "the quirk is not negligible"


def test_opm_hook_adds_the_theta_gradient_only_when_asked(monkeypatch):
    import lightning as L

    grads = {}
    for flag in (False, True):
        task, batch = build("ave", UnimodalConfig())
        opm = OPM(q_base=0.4, lam=0.5, p_exe=1.0, warmup_epochs=0, official_theta_grad=flag)
        opm._trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        task.log = lambda *a, **k: None
        task.feature_hooks.append(opm._hook)
        task.train()
        feats, outputs = task(batch)
        torch.stack(list(task.compute_losses(outputs, batch).values())).sum().backward()
        grads[flag] = [p.grad.clone() for p in task.modality_parameters()["audio"] if p.grad is not None]
        assert opm.last["executed"] == 1.0
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))
    assert OPM().window.warmup == 6, "class default = the official 6 warm-up epochs (= the preset)"


# ------------------------------------------------------------------------- 5. valuation bands and subset
def official_sample_level_copies(contribution):
    """``AV_KS_Dataset_sample_level``: copies appended per sample, audio then visual."""
    out = []
    for contrib_a, contrib_v in contribution:
        row = []
        for c in (contrib_a, contrib_v):
            if 0.4 < c < 1:
                row.append(1)
            elif -0.1 < c < 0.4:
                row.append(2)
            elif c < -0.1:
                row.append(3)
            else:
                row.append(0)
        out.append(row)
    return np.array(out)


def test_sample_level_bands_match_the_official_inequalities():
    phi = np.array([1.5, 1.0, 0.999, 0.5, 0.4, 0.399, 0.0, -0.1, -0.1001, -0.5, 1 / 3, -1 / 3])
    contribution = np.stack([phi, phi[::-1]], axis=1)
    expected = official_sample_level_copies(contribution)
    assert sample_level_copies(contribution[:, 0]).tolist() == expected[:, 0].tolist()
    assert sample_level_copies(contribution[:, 1]).tolist() == expected[:, 1].tolist()
    assert sample_level_copies(np.array([0.4, -0.1, 1.0])).tolist() == [0, 0, 0], "boundaries: no copy"


def test_modality_level_subset_is_drawn_with_replacement_as_official():
    n = 50
    index = np.arange(n)
    phi_a, phi_v = np.linspace(-0.5, 1.5, n), np.linspace(1.5, -0.5, n) ** 2
    seed = 3
    choice = np.random.default_rng(seed).choice(n, int(n * 0.2))  # official: np.random.choice(N, num)
    gap_a, gap_v = 1.0 - phi_a[choice].mean(), 1.0 - phi_v[choice].mean()
    expected_count = int(abs(gap_a - gap_v) * (2.0 / 3.0) * 1.0 * n)
    indices, _, _ = modality_level_plan(index, phi_a, phi_v, n, 0.2, 1.0, np.random.default_rng(seed))
    assert len(indices) - n == expected_count
    distinct = modality_level_plan(index, phi_a, phi_v, n, 0.2, 1.0, np.random.default_rng(seed), part_replace=False)
    assert len(distinct[0]) > n
