"""MMPareto: the combination rule against a transcription of the authors' step, and the callback in real fits.

Transcribed (tests only) from ``GeWu-Lab/MMPareto_ICML2024`` a339db3 ``code/MMPareto.py`` ``train_epoch`` and
``code/min_norm_solvers.py`` ``MinNormSolver._min_norm_element_from2`` / ``_min_norm_2d``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision

from avmoe.callbacks import MMPareto, mmpareto_combine
from avmoe.callbacks.mmpareto import enhance, pareto_weights
from tests.test_callbacks import imbalanced_release, make_datamodule, make_task, make_trainer  # noqa: F401


# ------------------------------------------------------------------------------------------- transcription
def _official_min_norm_from2(v1v1, v1v2, v2v2):
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _official_find_min_norm_element(vecs):
    """Two vectors: ``_min_norm_2d`` then return ``sol_vec`` (n < 3); dot products summed over list entries."""
    dps = {}
    for i, j in ((0, 0), (0, 1), (1, 1)):
        dps[(i, j)] = sum(torch.mul(a, b).sum().double() for a, b in zip(vecs[i], vecs[j]))
    c, _ = _official_min_norm_from2(float(dps[(0, 0)]), float(dps[(0, 1)]), float(dps[(1, 1)]))
    return [c, 1 - c]


def official_step(both: dict, uni: dict, total: dict, gamma: float = 1.5) -> dict:
    """One modality of the official ``train_epoch``: ``both``/``uni`` per-tensor grads, ``total`` = grads of the
    summed loss. As the official code, the solver receives ``list(grads[t].values())``, which includes the
    ``concat`` entry (every dot product counted twice: the weights do not change)."""
    both = {**both, "concat": torch.cat([g.flatten() for g in both.values()])}
    uni = {**uni, "concat": torch.cat([g.flatten() for g in uni.values()])}
    cos = F.cosine_similarity(both["concat"], uni["concat"], dim=0)
    k = [0.5, 0.5] if cos > 0 else _official_find_min_norm_element([list(both.values()), list(uni.values())])
    out = {}
    for name, grad in total.items():
        three_norm = torch.norm(grad.clone())
        new_grad = 2 * k[0] * both[name] + 2 * k[1] * uni[name]
        new_norm = torch.norm(new_grad)
        diff = three_norm / new_norm
        out[name] = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    return out


CASES = {
    "agree": (1.0, 0.0),  # uni = mm + noise (cos > 0)
    "conflict": (-1.0, 0.0),  # uni ~ -mm (cos < 0): min-norm interior
    "conflict_small_uni": (-0.05, 0.0),  # the min-norm point leans to the small uni-modal gradient
    "conflict_large_uni": (-20.0, 0.0),
}
# With a conflict (mm.uni <= 0) the solver's edge cases (0.999 / 0.001) are reached only by zero gradients:
# test_zero_gradients_never_give_nan covers them.


@pytest.mark.parametrize("case", CASES)
def test_combine_matches_the_official_step_on_one_tensor(case):
    sign, _ = CASES[case]
    gen = torch.Generator().manual_seed(3)
    mm = torch.randn(6, 5, generator=gen)
    uni = sign * mm + 0.3 * abs(sign) * torch.randn(6, 5, generator=gen)
    expected = official_step({"w": mm}, {"w": uni}, {"w": mm + uni})["w"]
    got = mmpareto_combine(mm, uni, gamma=1.5)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    w_mm, _, cos = pareto_weights(float(mm.double().pow(2).sum()), float((mm.double() * uni).sum()),
                                  float(uni.double().pow(2).sum()))
    if case == "agree":
        assert cos > 0 and w_mm == 0.5
        torch.testing.assert_close(got, 1.5 * (mm + uni)), "no conflict: 1.5 (g_mm + g_u)"
    else:
        assert cos < 0 and 0.0 < w_mm < 1.0
        assert (w_mm < 0.5) == (case == "conflict_small_uni"), "more weight on the smaller gradient"


def test_group_weights_and_per_tensor_enhancement_match_the_official_step():
    """Cosine and weights over the whole group, the magnitude rule per tensor, total from a third loss too."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (5, 4)}
    both = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    uni = {n: -0.7 * g + 0.2 * torch.randn(g.shape, generator=gen) for n, g in both.items()}
    other = {n: 0.1 * torch.randn(g.shape, generator=gen) for n, g in both.items()}  # the other uni-modal loss
    total = {n: both[n] + uni[n] + other[n] for n in both}
    expected = official_step(both, uni, total)
    mm = torch.cat([g.flatten() for g in both.values()]).double()
    u = torch.cat([g.flatten() for g in uni.values()]).double()
    w_mm, w_u, cos = pareto_weights(float(mm @ mm), float(mm @ u), float(u @ u))
    assert cos < 0
    for name in shapes:
        torch.testing.assert_close(enhance(both[name], uni[name], total[name], w_mm, w_u, 1.5), expected[name].float(),
                                   rtol=1e-5, atol=1e-6)


def test_zero_gradients_never_give_nan():
    mm = torch.randn(3, 4)
    zero = torch.zeros(3, 4)
    out = mmpareto_combine(mm, zero)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.5 * mm), "zero uni-modal gradient: 0.001 weight, then rescaled to 1.5 |g_mm|"
    official = official_step({"w": mm}, {"w": zero}, {"w": mm})["w"]
    torch.testing.assert_close(out, official.float(), rtol=1e-5, atol=1e-6)
    both_zero = mmpareto_combine(zero, zero)
    assert torch.equal(both_zero, zero)
    # A tensor with no multimodal/uni-modal gradient but a total one (another loss): officially |g|/0 = inf and
    # inf * 0 = NaN (issue #5); zero here.
    ones = torch.ones(3, 4)
    assert torch.isnan(official_step({"w": zero}, {"w": zero}, {"w": ones})["w"]).all(), "the official NaN"
    assert torch.equal(enhance(zero, zero, ones, 0.5, 0.5, 1.5), zero)


# ------------------------------------------------------------------------------------------- in a fit
class Grads(Callback):
    """Copies every gradient at ``on_before_optimizer_step`` (before / after MMPareto, by list order)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _reference_grads(task, batch, gamma=1.5):
    """Manual MMPareto on one batch: per-loss grads with autograd, the rule over each modality group."""
    task.train()
    feats, outputs = task(batch)
    losses = task.compute_losses(outputs, batch)
    mm = torch.stack(list(losses.values())).sum() + feats.aux_loss
    uni = task.unimodal_outputs(feats, batch)
    l_u = {m: torch.stack(list(task.compute_losses(uni[m], batch).values())).sum() for m in ("audio", "visual")}
    params = [p for p in task.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
             for loss in (mm, l_u["audio"], l_u["visual"])]
    z = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in grads]
    total = {id(p): z[0][i] + z[1][i] + z[2][i] for i, p in enumerate(params)}
    out = dict(total)
    for k, m in ((1, "audio"), (2, "visual")):
        group = task.modality_parameters()[m]
        idx = [next(i for i, q in enumerate(params) if q is p) for p in group]
        both = {str(i): z[0][i] for i in idx}
        own = {str(i): z[k][i] for i in idx}
        res = official_step(both, own, {str(i): total[id(params[i])] for i in idx}, gamma)
        for i in idx:
            out[id(params[i])] = res[str(i)]
    return {n: out[id(p)] for n, p in task.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_callback_gradients_equal_the_manual_official_step(imbalanced_release, tmp_path):
    """One real Lightning step: the gradients MMPareto leaves equal the transcription on the same batch;
    the plain run differs (the callback acts)."""
    from avmoe.datamodules import collate  # noqa: PLC0415

    dm = make_datamodule(imbalanced_release, batch_size=4)
    dm.setup("fit")
    ref_task = make_task(use_bn=False)
    batch = collate([dm.dataset("train")[i] for i in range(4)])
    # The seeded sampler of the fit is replaced by a fixed first batch: limit to one batch of an unshuffled loader.
    dm.train_dataloader = lambda: torch.utils.data.DataLoader(dm.dataset("train"), batch_size=4, collate_fn=collate)
    expected = _reference_grads(ref_task, batch)
    cb, grads = MMPareto(), Grads()
    task = make_task(use_bn=False)
    make_trainer(tmp_path, [cb, grads], max_steps=1).fit(task, dm)
    got = grads.steps[0]
    assert cb.num_combined == 1 and set(cb.last) >= {"cos_audio", "cos_visual", "w_mm_audio", "w_mm_visual"}
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g.float(), rtol=2e-4, atol=1e-6, msg=name)
    assert task.gradient_policy is None, "unplugged at fit end"
    plain_grads = Grads()
    make_trainer(tmp_path, [plain_grads], max_steps=1).fit(make_task(use_bn=False), dm)
    plain = plain_grads.steps[0]
    assert any(not torch.allclose(got[n], plain[n]) for n in got), "MMPareto changes the gradients" 


@pytest.mark.slow
def test_accumulation_acts_once_on_the_summed_gradients(imbalanced_release, tmp_path):
    """1 x batch 4 and 2 x batch 2 over the same samples give the same combined gradients (large-batch form)."""
    from avmoe.datamodules import collate  # noqa: PLC0415

    results = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        dm = make_datamodule(imbalanced_release, batch_size=batch_size)
        dm.setup("fit")
        dm.train_dataloader = (lambda d=dm, b=batch_size: torch.utils.data.DataLoader(
            d.dataset("train"), batch_size=b, collate_fn=collate))
        cb, grads = MMPareto(), Grads()
        make_trainer(tmp_path, [cb, grads], max_steps=1, accumulate_grad_batches=accumulate).fit(
            make_task(use_bn=False), dm)
        results.append((grads.steps[0], dict(cb.last)))
    (g1, l1), (g2, l2) = results
    for key in ("cos_audio", "cos_visual", "w_mm_audio", "w_mm_visual"):
        assert l2[key] == pytest.approx(l1[key], rel=1e-4, abs=1e-6), key
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


class ZeroUnimodal(MMPareto):
    """Uni-modal losses with no gradient on anything (x * 0): the zero-norm path in a real step."""

    def training_losses(self, task, feats, outputs, batch, losses):
        out = super().training_losses(task, feats, outputs, batch, losses)
        return {k: (v * 0.0 if k.startswith("loss_uni") else v) for k, v in out.items()}


@pytest.mark.slow
def test_zero_unimodal_gradient_and_amp(imbalanced_release, tmp_path):
    task = make_task()
    cb = ZeroUnimodal()
    make_trainer(tmp_path, [cb], max_steps=2).fit(task, make_datamodule(imbalanced_release, batch_size=2))
    assert cb.num_combined == 2 and cb.last["w_mm_audio"] == 0.001 and cb.last["cos_audio"] == 0.0
    assert all(torch.isfinite(p).all() for p in task.parameters())
    for precision in ("bf16-mixed", "16-mixed"):
        task, cb = make_task(), MMPareto()
        # Lightning turns "16-mixed" into bf16 on CPU; the plugin with an explicit CPU GradScaler runs fp16 autocast
        # and scales the loss, as on a GPU.
        kwargs = ({"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))]}
                  if precision == "16-mixed" else {"precision": precision})
        steps = 2 if precision == "16-mixed" else 1  # fp16: the scaler may skip a first overflowing step
        trainer = make_trainer(tmp_path, [cb], max_steps=steps, **kwargs)
        trainer.fit(task, make_datamodule(imbalanced_release, batch_size=2))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        assert (scaler is not None) == (precision == "16-mixed")
        assert cb.num_combined + cb.num_skipped_nonfinite == steps and cb.num_combined >= 1, precision
        assert all(torch.isfinite(p).all() for p in task.parameters()), precision
        assert math.isfinite(cb.last.get("cos_audio", 0.0))
