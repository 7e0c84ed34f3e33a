"""MMCSAL stage 2: greedy selection from uni-modal and cross-modal distances with a cross-modal alignment term.

Certain (MMCSAL abstract, arXiv 2412.09126): selection computes both uni-modal and cross-modal distances and
regularises cross-modal alignment of the chosen pairs. Secondary summaries name three terms (distribution,
diversity, alignment, weight lambda_align). The forms below are a reconstruction:

On the normalised stage-1 embeddings z_a, z_v (N, d), with ``d_m(i, j) = 1 - z_m^i . z_m^j`` (m = a, v) and the
symmetrised cross-modal ``d_x(i, j) = 1 - (z_a^i . z_v^j + z_v^i . z_a^j) / 2``:

- typicality ``rho(i)``: TypiClust-style 1 / (mean distance to the k nearest neighbours), averaged over d_a, d_v
  and (weight ``cross_weight``) d_x;
- alignment ``al(i) = z_a^i . z_v^i`` (a pair whose sound is off screen aligns poorly);
- diversity: ``min_{j in S} d(i, j)`` with ``d = (d_a + d_v + d_x) / 3`` (1 for every point while S is empty).

Each term is min-max normalised to [0, 1] over the candidates; the greedy step picks
``argmax_i  w_typ * rho(i) + w_div * div(i) + w_align * al(i)`` among the unselected points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import _check


@dataclass
class Stage2Config:
    """Weights of the greedy selection objective (each term normalised to [0, 1] first)."""

    typicality_weight: float = 1.0
    diversity_weight: float = 1.0
    alignment_weight: float = 0.5
    """lambda_align: preference for pairs whose audio and visual embeddings agree."""
    cross_weight: float = 1.0
    """Weight of the cross-modal kNN distance in the typicality (uni-modal distances have weight 1 each)."""
    k_nn: int = 20


def _minmax(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    ref = x if mask is None else x[mask]
    if ref.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = ref.min(), ref.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


CHUNK = 2048  # rows of a distance block: memory is O(CHUNK * N), never O(N^2)


def _pair_distances(a: torch.Tensor, v: torch.Tensor, rows: slice) -> tuple[torch.Tensor, ...]:
    """d_a, d_v, d_x (r, N) of the points ``rows`` against every point (unit-norm a, v (N, d))."""
    ar, vr = a[rows], v[rows]
    return 1 - ar @ a.T, 1 - vr @ v.T, 1 - 0.5 * (ar @ v.T + vr @ a.T)


def _knn_mean(d: torch.Tensor, k: int, rows: slice | None) -> torch.Tensor:
    """Mean of the k smallest distances per row of d (r, N); ``rows``: exclude each row's own column."""
    if rows is not None:
        d = d.clone()
        idx = torch.arange(d.shape[0])
        d[idx, idx + rows.start] = float("inf")
    return d.topk(k, dim=1, largest=False).values.mean(1)


def mmcsal_terms(za: np.ndarray, zv: np.ndarray, config: Stage2Config) -> dict[str, torch.Tensor]:
    """Per-sample ``typicality`` (N,) and ``alignment`` (N,) of normalised embeddings, plus ``a`` / ``v`` (N, d)."""
    a = F.normalize(torch.as_tensor(np.asarray(za), dtype=torch.float64), dim=-1)
    v = F.normalize(torch.as_tensor(np.asarray(zv), dtype=torch.float64), dim=-1)
    n = len(a)
    k_uni, k_x = max(1, min(config.k_nn, n - 1)), max(1, min(config.k_nn, n))
    rho = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, CHUNK):
        rows = slice(s, min(s + CHUNK, n))
        d_a, d_v, d_x = _pair_distances(a, v, rows)
        typ = 1 / (_knn_mean(d_a, k_uni, rows) + 1e-5) + 1 / (_knn_mean(d_v, k_uni, rows) + 1e-5)
        typ = typ + config.cross_weight / (_knn_mean(d_x, k_x, None) + 1e-5)  # includes the clip's own pair
        rho[rows] = typ / (2 + config.cross_weight)
    return {"typicality": rho, "alignment": (a * v).sum(1), "a": a, "v": v}


def combined_distance(a: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
    """``d(i, j) = (d_a + d_v + d_x) / 3`` of every point i to point j, (N,)."""
    return 1 - (a @ a[j] + v @ v[j] + 0.5 * (a @ v[j] + v @ a[j])) / 3


def mmcsal_select(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0,
                  audio_dim: int = 0, config: Stage2Config = Stage2Config(),
                  scores: Optional[dict[str, np.ndarray]] = None) -> np.ndarray:
    """Greedy MMCSAL selection on ``features = [z_a, z_v]`` (N, audio_dim + d_v); returns ``budget`` new indices.

    ``seed`` is unused (the greedy is deterministic; ties go to the lowest index). ``scores`` (if given) receives
    the per-sample ``typicality``, ``alignment`` and the objective ``gain`` at the moment each pick was made.
    """
    feats, lab = _check(features, budget, labelled)
    if not 0 < audio_dim < feats.shape[1]:
        raise ValueError(f"audio_dim must split the {feats.shape[1]} feature columns into audio and visual, "
                         f"got {audio_dim}")
    terms = mmcsal_terms(feats[:, :audio_dim], feats[:, audio_dim:], config)
    n = len(feats)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.from_numpy(lab)] = True
    free = ~chosen
    rho = _minmax(terms["typicality"], free)
    align = _minmax(terms["alignment"], free)
    a, v = terms["a"], terms["v"]
    min_d = torch.full((n,), float("inf"), dtype=torch.float64)  # distance to the nearest chosen point
    for j in torch.nonzero(chosen).flatten().tolist():
        min_d = torch.minimum(min_d, combined_distance(a, v, j))
    gains = torch.full((n,), float("nan"), dtype=torch.float64)
    picks: list[int] = []
    for _ in range(budget):
        div = _minmax(min_d, ~chosen) if chosen.any() else torch.ones(n, dtype=torch.float64)
        obj = config.typicality_weight * rho + config.diversity_weight * div + config.alignment_weight * align
        obj[chosen] = -float("inf")
        best = int(obj.argmax())
        picks.append(best)
        gains[best] = obj[best]
        chosen[best] = True
        min_d = torch.minimum(min_d, combined_distance(a, v, best))
    if scores is not None:
        gain = gains.numpy()
        if "gain" in scores:  # nested budgets: keep the gains of the earlier rounds' picks
            gain = np.where(np.isnan(gain), scores["gain"], gain)
        scores.update({"typicality": terms["typicality"].numpy(), "alignment": terms["alignment"].numpy(),
                       "gain": gain})
    return np.asarray(picks, dtype=np.int64)
