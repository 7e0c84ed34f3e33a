"""CRMT building blocks (plain torch): orthogonal-normalised linear fusion, margin regulariser, certified bound.

Source: Yang, Wei, Liang, Hu, "Quantifying and Enhancing Multi-modal Robustness with Modality Preference",
ICLR 2024 (arXiv 2402.06244); github.com/GeWu-Lab/Certifiable-Robust-Multi-modal-Training ``models/fusion_model.py``
(``orthogonal_linear``, ``OWNNorm``) and ``train.py`` (``train_CRMT_JT``, ``get_lip``, ``the_second_step``,
``generate_AT_sample``).

- :class:`OrthogonalFusion`: one ``fc`` Linear over the concatenated per-modality features; each modality's column
  block W^m is normalised per class row by ``OWNNorm(norm_groups=C)``. With one row per group the official SVD
  whitening reduces to centring the row over the feature dimension and L2-normalising it (the SVD of a 1x1 matrix
  is the scalar itself), which is what we compute (no SVD: it also runs in half precision). Uni-modal logits
  ``h^m = W~^m phi^m``, fused ``sum_m a^m * h^m + b`` with ``a^m`` in R^C initialised at 0.1.
- :func:`margin_loss`: ``rho * mean log(sum_m sum_{k != y} exp(h^m_k - h^m_y) + 1e-5)`` (rho = 2.0 in
  ``cfgs/methods/CRMT_*.yaml``); the official code computes ``sum_k exp(h_k) exp(-h_y) - 1``, the same quantity,
  which overflows in fp16; this is the logsumexp form.
- :func:`certified_bound`: ``r(x) = [sum_m (a^m_y h^m_y - a^m_j h^m_j) + b_y - b_j] /
  sqrt(sum_m (a^m_y L^m_y + a^m_j L^m_j)^2)`` with j the runner-up class of the fused output and L^m_k the
  Lipschitz constant of ``h^m_k`` in the input of modality m (:func:`lipschitz_constants`); stage 2 maximises its
  mean over ``a`` only (:func:`stage2_loss` is its negative, as ``the_second_step``).
- :func:`crmt_at_inputs`: CRMT-AT's training-time adversarial inputs (5 steps of eps/5, joint L2-normalised
  gradient with 1e-6 inside the root, the perturbation clamped element-wise to +-2 eps).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

CRMT_RHO = 2.0  # cfgs/methods/CRMT_JT.yaml, CRMT_AT.yaml
CRMT_A_INIT = 0.1  # orthogonal_linear: a_0 = a_1 = 0.1
CRMT_AT_EPS = 0.1
MARGIN_EPS = 1e-5


def orthogonal_rows(weight: Tensor) -> Tensor:
    """``OWNNorm(norm_groups=C)`` on a (C, d) block: each row centred over d and L2-normalised."""
    centred = weight - weight.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class OrthogonalFusion(nn.Module):
    """CRMT's fusion layer over per-modality features.

    Args:
        dims: feature size per modality, in order (e.g. ``{"audio": 512, "visual": 512}``).
        num_classes: C.
        a_init: initial integration weights a^m (0.1 as the official code).

    ``forward(feats: {m: (B, d_m)}) -> (uni {m: (B, C)}, fused (B, C))``.
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, a_init: float = CRMT_A_INIT) -> None:
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes)
        self.a = nn.ParameterDict({m: nn.Parameter(torch.full((num_classes,), float(a_init))) for m in dims})
        # L^m_k of the trained model (CRMT stage 2 estimates it on the training set); saved with the checkpoint so
        # that any later test reports the certified bound. Zero = not estimated yet.
        self.register_buffer("lipschitz", torch.zeros(len(self.modalities), num_classes))

    def lipschitz_dict(self) -> dict[str, Tensor]:
        return {m: self.lipschitz[i] for i, m in enumerate(self.modalities)}

    def weights(self) -> dict[str, Tensor]:
        """The normalised class weights W~^m, each (C, d_m)."""
        out, start = {}, 0
        for m in self.modalities:
            out[m] = orthogonal_rows(self.fc.weight[:, start:start + self.dims[m]])
            start += self.dims[m]
        return out

    def forward(self, feats: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        weights = self.weights()
        uni = {m: feats[m] @ weights[m].t() for m in self.modalities}  # (B, C) each
        fused = sum(self.a[m] * uni[m] for m in self.modalities) + self.fc.bias
        return uni, fused


def margin_loss(uni: Mapping[str, Tensor], labels: Tensor, rho: float = CRMT_RHO) -> Tensor:
    """CRMT step-1 margin regulariser (see module docstring). uni {m: (B, C)}, labels (B,) -> scalar."""
    terms = []
    for h in uni.values():
        h = h.float()
        diff = h - h.gather(1, labels[:, None])  # h_k - h_y, (B, C)
        diff = diff.scatter(1, labels[:, None], float("-inf"))  # exclude k = y
        terms.append(diff)
    stacked = torch.cat(terms + [torch.full_like(terms[0][:, :1], math.log(MARGIN_EPS))], dim=1)
    return rho * torch.logsumexp(stacked, dim=1).mean()


def runner_up(fused: Tensor, labels: Tensor) -> Tensor:
    """The highest-scoring class other than the label, (B,)."""
    return fused.detach().scatter(1, labels[:, None], float("-inf")).argmax(dim=1)


def certified_bound(uni: Mapping[str, Tensor], fused: Tensor, labels: Tensor, a: Mapping[str, Tensor],
                    bias: Tensor, lipschitz: Mapping[str, Tensor]) -> Tensor:
    """Per-sample certified lower bound r(x) of the robustness radius (B,); negative when misclassified.

    Args:
        uni: uni-modal logits h^m (B, C).
        fused: fused logits (B, C) (selects the runner-up class j).
        labels: (B,).
        a: integration weights a^m (C,).
        bias: fusion bias (C,).
        lipschitz: L^m (C,) per modality.
    """
    j = runner_up(fused, labels)
    rows = torch.arange(len(labels), device=labels.device)
    numer = bias[labels] - bias[j]
    denom = 0.0
    for m, h in uni.items():
        numer = numer + a[m][labels] * h[rows, labels] - a[m][j] * h[rows, j]
        denom = denom + (a[m][labels] * lipschitz[m][labels] + a[m][j] * lipschitz[m][j]) ** 2
    return numer / torch.sqrt(denom).clamp(min=1e-12)


def stage2_loss(uni: Mapping[str, Tensor], fused: Tensor, labels: Tensor, a: Mapping[str, Tensor], bias: Tensor,
                lipschitz: Mapping[str, Tensor]) -> Tensor:
    """``the_second_step``: minus the mean certified bound, with the logits and bias detached (only a trains)."""
    return -certified_bound({m: h.detach() for m, h in uni.items()}, fused, labels, a, bias.detach(),
                            lipschitz).mean()


def lipschitz_constants(fused_fn: Callable[[dict[str, Tensor]], Tensor], inputs: Mapping[str, Tensor],
                        num_classes: int) -> dict[str, Tensor]:
    """Per-batch ``L[m, k] = max_x ||d fused_k / d x^m||_2`` (``get_lip``; take the max over batches and ranks).

    Each class's gradient is taken on its own (``get_lip`` zeroes only the audio gradient between classes, which
    accumulates the visual one across classes; not reproduced).
    """
    with torch.enable_grad():
        leaves = {m: x.detach().requires_grad_(True) for m, x in inputs.items()}
        fused = fused_fn(leaves)
        out = {m: torch.zeros(num_classes, device=fused.device) for m in leaves}
        for k in range(num_classes):
            grads = torch.autograd.grad(fused[:, k].sum(), list(leaves.values()), retain_graph=k < num_classes - 1,
                                        allow_unused=True)
            for m, g in zip(leaves, grads):
                if g is not None:
                    out[m][k] = g.flatten(1).norm(dim=1).max()
    return out


def crmt_at_inputs(loss_fn: Callable[[dict[str, Tensor]], Tensor], inputs: Mapping[str, Tensor],
                   eps: float = CRMT_AT_EPS, steps: int = 5, modalities: Sequence[str] | None = None
                   ) -> dict[str, Tensor]:
    """CRMT-AT adversarial inputs (``generate_AT_sample``), detached; modalities default to all inputs."""
    names = list(modalities or inputs)
    clean = {m: inputs[m].detach() for m in names}
    adv = dict(clean)
    alpha = eps / steps
    for _ in range(steps):
        with torch.enable_grad():
            leaves = {m: x.detach().requires_grad_(True) for m, x in adv.items()}
            loss = loss_fn({**inputs, **leaves})
            grads = torch.autograd.grad(loss, list(leaves.values()))
        norm = torch.sqrt(sum(g.flatten(1).norm(dim=1) ** 2 for g in grads) + 1e-6)  # (B,)
        for (m, x), g in zip(leaves.items(), grads):
            step = x.detach() + alpha * g / norm.view(-1, *([1] * (g.dim() - 1)))
            adv[m] = clean[m] + (step - clean[m]).clamp(-2 * eps, 2 * eps)
    return {**inputs, **{m: a.detach() for m, a in adv.items()}}
