"""Strategy registry: a name and a feature view -> one nested selection order over the pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from . import baselines
from .mmcsal import Stage2Config, mmcsal_select

StrategyName = Literal["random", "kmeans", "kcenter", "typiclust", "probcover", "mmcsal"]
View = Literal["concat", "audio", "visual"]
STRATEGIES = ("random", "kmeans", "kcenter", "typiclust", "probcover", "mmcsal")


@dataclass
class ProbCoverConfig:
    delta: Optional[float] = None
    """Ball radius; None picks it by purity (the largest radius with purity >= alpha)."""
    alpha: float = 0.95
    num_classes: int = 10
    """Pseudo-classes of the purity k-means (the number of classes, or a guess of it)."""


@dataclass
class BaselineConfig:
    """Options of the baseline strategies."""

    kcenter_first: baselines.FirstCentre = "mean"
    """k-center greedy's first centre in cold start: ``mean`` (nearest the pool mean) or ``random``."""
    typiclust_max_clusters: int = 500
    probcover: ProbCoverConfig = field(default_factory=ProbCoverConfig)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def feature_view(audio: np.ndarray, visual: np.ndarray, view: View) -> np.ndarray:
    """L2-normalised features of one view: ``concat`` = [a^, v^] / sqrt(2) (unit norm), or one modality."""
    if view == "concat":
        return np.concatenate([normalise(audio), normalise(visual)], 1) / np.sqrt(2)
    if view == "audio":
        return normalise(audio)
    if view == "visual":
        return normalise(visual)
    raise ValueError(f"view must be 'concat', 'audio' or 'visual', got {view!r}")


def select_order(strategy: StrategyName, audio: np.ndarray, visual: np.ndarray, budgets: Sequence[int], seed: int,
                 view: View = "concat", baseline: BaselineConfig = BaselineConfig(),
                 stage2: Stage2Config = Stage2Config(), info: Optional[dict] = None) -> np.ndarray:
    """Selection order (max(budgets),) of pool positions; its first B entries are the selection for budget B.

    ``mmcsal`` ignores ``view`` (it uses both modalities' embeddings). ``info`` receives strategy details
    (ProbCover's delta, MMCSAL's per-sample terms).
    """
    if len(audio) != len(visual):
        raise ValueError(f"{len(audio)} audio but {len(visual)} visual feature rows")
    if len(audio) == 0:
        raise ValueError("the pool is empty: nothing to select from")
    too_big = [b for b in budgets if b > len(audio)]
    if too_big:
        raise ValueError(f"budget {max(too_big)} is larger than the pool ({len(audio)} samples)")
    if strategy == "mmcsal":
        scores: dict = {}
        feats = np.concatenate([normalise(audio), normalise(visual)], 1)
        order = baselines.nested_selection(mmcsal_select, feats, budgets, seed=seed, audio_dim=audio.shape[1],
                                           config=stage2, scores=scores)
        if info is not None:
            info.update(scores)
        return order
    feats = feature_view(audio, visual, view)
    if strategy == "random":
        return baselines.nested_selection(baselines.random_select, feats, budgets, seed)
    if strategy == "kmeans":
        return baselines.nested_selection(baselines.kmeans_select, feats, budgets, seed)
    if strategy == "kcenter":
        return baselines.nested_selection(baselines.kcenter_greedy, feats, budgets, seed, first=baseline.kcenter_first)
    if strategy == "typiclust":
        return baselines.nested_selection(baselines.typiclust_select, feats, budgets, seed,
                                          max_clusters=baseline.typiclust_max_clusters)
    if strategy == "probcover":
        pc = baseline.probcover
        delta = pc.delta if pc.delta is not None else baselines.purity_radius(feats, pc.num_classes, pc.alpha, seed)
        if info is not None:
            info["delta"] = delta
        return baselines.nested_selection(baselines.probcover_select, feats, budgets, seed, delta=delta)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
