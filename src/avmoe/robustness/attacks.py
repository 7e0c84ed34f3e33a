"""L2 evasion attacks on one or both modalities: FGM and L2-PGD, as in CRMT's ``rob_test.py``.

Source: Yang et al., "Quantifying and Enhancing Multi-modal Robustness with Modality Preference", ICLR 2024,
github.com/GeWu-Lab/Certifiable-Robust-Multi-modal-Training ``rob_test.py`` (``multimodal_attack`` /
``unimodal_attack``). Pure tensor functions: the objective is a closure, so any task's own loss plugs in.

- **joint** radius (``multimodal_attack``): each step moves ``alpha * g_m / sqrt(sum_m ||g_m||^2)`` (per sample,
  gradients flattened), so the perturbation of all attacked modalities together lies in one L2 ball of ``eps``;
- **per-modality** radii (``unimodal_attack``): each modality's gradient is normalised on its own and scaled by
  its own ``alpha_m``; we project each modality onto its own ball ``eps_m`` (the official code projects onto the
  joint ball ``sqrt(sum eps_m^2)``; both agree whenever a single modality is attacked, the CRMT protocol);
- FGM is one step of size ``eps``; PGD starts at the clean input and runs ``steps`` (4) steps of ``alpha =
  eps / 3``, projecting after each; ``clamp`` (visual: the valid pixel box) is applied after every step, which
  keeps the perturbation inside its ball because the clean input lies in the box.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional

import torch
from torch import Tensor

Inputs = dict[str, Tensor]
LossFn = Callable[[Inputs], Tensor]
Clamp = Callable[[Tensor], Tensor]
ATTACKS = ("fgm", "pgd_l2")
PGD_STEPS = 4
PGD_ALPHA_RATIO = 1.0 / 3.0
TINY = 1e-12


def sample_norms(x: Tensor) -> Tensor:
    """L2 norm of each sample (dim 0), shape (B,)."""
    return x.flatten(1).norm(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def joint_norms(tensors: Mapping[str, Tensor]) -> Tensor:
    """Per-sample L2 norm over all tensors together, (B,)."""
    return torch.sqrt(sum(sample_norms(t).pow(2) for t in tensors.values()))


def _normalised(grads: Inputs, joint: bool) -> Inputs:
    if joint:
        norm = joint_norms(grads).clamp(min=TINY)
        return {m: g / _bcast(norm, g) for m, g in grads.items()}
    return {m: g / _bcast(sample_norms(g).clamp(min=TINY), g) for m, g in grads.items()}


def project(delta: Inputs, eps: Mapping[str, float], joint: bool) -> Inputs:
    """Scale each sample's perturbation by ``min(1, eps / ||delta||)``: jointly (one radius, ``eps`` the same for
    every modality) or per modality."""
    if joint:
        radius = next(iter(eps.values()))
        scale = (radius / joint_norms(delta).clamp(min=TINY)).clamp(max=1.0)
        return {m: d * _bcast(scale, d) for m, d in delta.items()}
    return {m: d * _bcast((eps[m] / sample_norms(d).clamp(min=TINY)).clamp(max=1.0), d) for m, d in delta.items()}


def input_gradients(loss_fn: LossFn, inputs: Inputs) -> tuple[Tensor, Inputs]:
    """Loss and its gradient w.r.t. each input (parameters' ``.grad`` untouched). Needs grad mode, not inference."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks need gradients but inference mode is on: run the Trainer with "
                           "inference_mode=False (the avmoe CLI does this when a setting has an attack)")
    with torch.enable_grad():
        leaves = {m: x.detach().requires_grad_(True) for m, x in inputs.items()}
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), {m: (g if g is not None else torch.zeros_like(x)).detach()
                           for (m, x), g in zip(leaves.items(), grads)}


def l2_attack(
    loss_fn: LossFn,
    inputs: Inputs,
    eps: Mapping[str, float],
    method: Literal["fgm", "pgd_l2"] = "pgd_l2",
    joint: bool = True,
    steps: int = PGD_STEPS,
    alpha_ratio: float = PGD_ALPHA_RATIO,
    clamp: Optional[Mapping[str, Clamp]] = None,
) -> Inputs:
    """Adversarial versions of ``inputs`` that increase ``loss_fn``.

    Args:
        loss_fn: maps the (possibly perturbed) inputs to a scalar loss; other inputs of the model are closed over.
        inputs: clean tensors by modality, each (B, ...); only the ones in ``eps`` with ``eps > 0`` are attacked.
        eps: radius per attacked modality; with ``joint`` all values must be equal (the joint radius).
        method: ``fgm`` (one step of ``eps``) or ``pgd_l2`` (``steps`` steps of ``alpha_ratio * eps``).
        joint: one L2 ball over the attacked modalities (True) or one ball per modality.
        steps: PGD iterations (4 in CRMT).
        alpha_ratio: PGD step size relative to the radius (1/3 in CRMT).
        clamp: per modality, maps a tensor back into its valid range (applied after every step).

    Returns:
        Every input, attacked ones replaced by their adversarial version (detached).
    """
    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}; expected one of {ATTACKS}")
    eps = {m: float(e) for m, e in eps.items() if e > 0}
    if not eps:
        return dict(inputs)
    if joint and len(set(eps.values())) > 1:
        raise ValueError(f"a joint attack has one radius, got {eps}")
    missing = set(eps) - set(inputs)
    if missing:
        raise ValueError(f"attack radius for {sorted(missing)} but the inputs are {sorted(inputs)}")
    clamp = clamp or {}
    clean = {m: inputs[m].detach() for m in eps}
    rest = {m: x for m, x in inputs.items() if m not in eps}
    n_steps, ratio = (1, 1.0) if method == "fgm" else (steps, alpha_ratio)
    adv = dict(clean)
    for _ in range(n_steps):
        _, grads = input_gradients(lambda a: loss_fn({**rest, **a}), adv)
        step = _normalised(grads, joint)
        adv = {m: adv[m] + ratio * eps[m] * step[m] for m in adv}
        delta = project({m: adv[m] - clean[m] for m in adv}, eps, joint)
        adv = {m: clamp[m](clean[m] + delta[m]) if m in clamp else clean[m] + delta[m] for m in adv}
    return {**rest, **{m: a.detach() for m, a in adv.items()}}
