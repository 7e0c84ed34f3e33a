"""Cold-start selection baselines: random, k-means, k-center greedy, TypiClust, ProbCover.

Every strategy has the signature ``strategy(features (N, D) float, budget, labelled (L,) int, seed) -> (budget,) int``:
it returns ``budget`` *new* pool indices (none of them in ``labelled``) in selection order. ``labelled`` is how
nested budgets are built (:func:`nested_selection`): the picks for budget B2 > B1 are the B1 picks plus B2 - B1
picks made with the B1 picks as the labelled set, so each budget contains the smaller one.

Sources (formulas and constants):

- random: uniform without replacement (as ``MengShen0709/bmmal`` ``strategy/random``), a seeded permutation;
- k-means: K = budget clusters (k-means++ init), the point closest to each centroid (bmmal ``strategy/kmeans.py``).
  bmmal takes the ``B // K + 1`` nearest points of each cluster in cluster-index order and truncates to B, which
  with K = B gives two points from each of the first B/2 clusters; here every cluster gives its nearest point
  first (round robin), so K = B clusters give B distinct cluster representatives;
- k-center greedy (Sener & Savarese, ICLR 2018, "Active Learning for CNNs: A Core-Set Approach"): farthest-first
  traversal. With no labelled point the first centre must be chosen explicitly (``first``): bmmal's
  ``k_center_greedy.py`` (@2cdf13f) tests ``self.already_selected is None`` after initialising it to ``[]``, so a
  cold start never gets a first centre and ``argmax`` of the unset ``min_distances`` fails;
- TypiClust (Hacohen et al., ICML 2022; official ``avihu111/TypiClust`` ``deep-al/pycls/al/typiclust.py``):
  min(|L| + B, 500) clusters, typicality 1 / (mean squared-L2 distance to the K=min(20, |cluster| // 2) nearest
  neighbours in the cluster + 1e-5), clusters of at most 5 points dropped, clusters visited by (already labelled
  count ascending, size descending). Official code fails once a visited cluster has no unlabelled point left;
  here exhausted clusters are skipped;
- ProbCover (Yehuda et al., NeurIPS 2022; official ``deep-al/pycls/al/prob_cover.py``): ball graph
  ``x -> y iff ||x - y|| < delta``, greedy max coverage (plain argmax, as the code; the paper randomises among
  the top degrees); delta from the purity criterion (:func:`purity_radius`). Two official quirks are not kept:
  its graph loop ``range(N // 500)`` leaves the last partial block of points without out-edges, and once all is
  covered its argmax of all-zero degrees picks point 0 again (a duplicate).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans

Strategy = Callable[..., np.ndarray]
FirstCentre = Literal["mean", "random"]


def _check(features: np.ndarray, budget: int, labelled: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    lab = np.zeros(0, dtype=np.int64) if labelled is None else np.asarray(labelled, dtype=np.int64).reshape(-1)
    if len(feats) == 0:
        raise ValueError("the pool is empty: nothing to select from")
    if budget < 0 or budget > len(feats) - len(np.unique(lab)):
        raise ValueError(f"budget {budget} exceeds the {len(feats) - len(np.unique(lab))} unlabelled samples of the "
                         f"pool ({len(feats)} samples, {len(np.unique(lab))} already selected)")
    return feats, lab


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, M) of a (N, D) and b (M, D), clamped at 0 (float64 for exact ties)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def random_select(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0) -> np.ndarray:
    """Uniform sample of ``budget`` unlabelled indices (a seeded permutation of the pool, labelled ones removed)."""
    feats, lab = _check(features, budget, labelled)
    order = np.random.default_rng(seed).permutation(len(feats))
    return order[~np.isin(order, lab)][:budget]


def kmeans_select(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0) -> np.ndarray:
    """K = ``budget`` k-means clusters (k-means++ init); the unlabelled point nearest each centroid (squared L2).

    Clusters that already hold a labelled point are visited last; clusters are taken largest first, and when
    fewer than ``budget`` picks result (empty clusters) the next-nearest points fill up, round robin.
    """
    feats, lab = _check(features, budget, labelled)
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(budget, len(feats))
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(feats)
    d = ((feats - km.cluster_centers_[km.labels_]) ** 2).sum(1)
    taken = np.zeros(len(feats), dtype=bool)
    taken[lab] = True
    has_labelled = np.bincount(km.labels_[lab], minlength=k) > 0 if len(lab) else np.zeros(k, dtype=bool)
    sizes = np.bincount(km.labels_, minlength=k)
    cluster_order = sorted(range(k), key=lambda c: (has_labelled[c], -sizes[c], c))
    # per cluster, its unlabelled points nearest-first
    members = {c: [int(i) for i in np.where(km.labels_ == c)[0][np.argsort(d[km.labels_ == c], kind="stable")]
                   if not taken[i]] for c in cluster_order}
    picks: list[int] = []
    depth = 0
    while len(picks) < budget:
        for c in cluster_order:
            if depth < len(members[c]) and len(picks) < budget:
                picks.append(members[c][depth])
        depth += 1
    return np.asarray(picks, dtype=np.int64)


def kcenter_greedy(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0,
                   first: FirstCentre = "mean") -> np.ndarray:
    """Farthest-first traversal: repeatedly pick ``argmax_i min_{j in labelled+picked} ||x_i - x_j||``.

    Args:
        first: the first centre when nothing is labelled (the cold-start case): ``mean`` the point nearest the
            pool mean, ``random`` a seeded uniform pick. Ignored when ``labelled`` is not empty.
    """
    feats, lab = _check(features, budget, labelled)
    x = torch.from_numpy(feats).double()
    picks: list[int] = []
    if len(lab):
        min_d = pairwise_sq_dists(x, x[torch.from_numpy(lab)]).min(1).values
    else:
        if budget == 0:
            return np.zeros(0, dtype=np.int64)
        if first == "mean":
            centre = int(pairwise_sq_dists(x, x.mean(0, keepdim=True))[:, 0].argmin())
        elif first == "random":
            centre = int(np.random.default_rng(seed).integers(len(feats)))
        else:
            raise ValueError(f"first must be 'mean' or 'random', got {first!r}")
        picks.append(centre)
        min_d = pairwise_sq_dists(x, x[centre:centre + 1])[:, 0]
    while len(picks) < budget:
        u = int(min_d.argmax())  # already chosen points have distance 0 and are never picked again
        picks.append(u)
        min_d = torch.minimum(min_d, pairwise_sq_dists(x, x[u:u + 1])[:, 0])
    return np.asarray(picks, dtype=np.int64)


def typicality(features: np.ndarray, k: int) -> np.ndarray:
    """1 / (mean squared-L2 distance to the ``k`` nearest other points + 1e-5), per point (TypiClust)."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).double()
    if k < 1:
        return np.ones(len(x))
    d = pairwise_sq_dists(x, x)
    knn = d.topk(k + 1, dim=1, largest=False).values[:, 1:]  # the first neighbour is the point itself
    return (1.0 / (knn.mean(1) + 1e-5)).numpy()


def typiclust_select(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0,
                     max_clusters: int = 500, min_cluster_size: int = 5, k_nn: int = 20) -> np.ndarray:
    """TypiClust (TPC-RP): the most typical unlabelled point of each cluster, clusters round robin.

    ``min_cluster_size``: clusters with at most this many points are dropped (5 as official). Typicality is
    computed among a cluster's *unlabelled* points, as official (picked points leave the cluster).
    """
    feats, lab = _check(features, budget, labelled)
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    n_clusters = min(len(lab) + budget, max_clusters, len(feats))
    if n_clusters <= 50:
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=5000, n_init=1, random_state=seed)
    labels = km.fit_predict(feats).astype(np.int64)
    sizes = np.bincount(labels, minlength=n_clusters)
    existing = np.bincount(labels[lab], minlength=n_clusters) if len(lab) else np.zeros(n_clusters, dtype=np.int64)
    clusters = [c for c in sorted(range(n_clusters), key=lambda c: (existing[c], -sizes[c], c))
                if sizes[c] > min_cluster_size]
    if not clusters:  # tiny pools: keep every cluster rather than selecting nothing
        clusters = sorted(range(n_clusters), key=lambda c: (existing[c], -sizes[c], c))
    labels[lab] = -1
    picks: list[int] = []
    i = 0
    while len(picks) < budget:
        live = [c for c in clusters if (labels == c).any()]
        if not live:
            clusters = sorted({int(c) for c in labels if c >= 0})  # dropped clusters are the only ones left
            continue
        cluster = live[i % len(live)]
        members = np.where(labels == cluster)[0]
        typ = typicality(feats[members], min(k_nn, len(members) // 2))
        idx = int(members[int(np.argmax(typ))])
        picks.append(idx)
        labels[idx] = -1
        i += 1
    return np.asarray(picks, dtype=np.int64)


def ball_graph(features: np.ndarray, delta: float, chunk: int = 4096) -> torch.Tensor:
    """Boolean (N, N) adjacency ``A[i, j] = ||x_i - x_j|| < delta`` (self loops included), in row chunks."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).double()
    rows = [torch.cdist(x[s:s + chunk], x) < delta for s in range(0, len(x), chunk)]
    return torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.bool)


def probcover_select(features: np.ndarray, budget: int, labelled: Optional[np.ndarray] = None, seed: int = 0,
                     delta: float = 0.75) -> np.ndarray:
    """ProbCover: greedy max coverage of the delta-ball graph.

    Points covered by a labelled point are removed first; then repeatedly the point whose ball covers the most
    uncovered points is picked (lowest index on ties). Once everything is covered the remaining picks are
    uniform among the unpicked points (seeded); the official code would pick point 0 again.
    """
    feats, lab = _check(features, budget, labelled)
    adj = ball_graph(feats, delta)
    covered = adj[torch.from_numpy(lab)].any(0) if len(lab) else torch.zeros(len(feats), dtype=torch.bool)
    chosen = np.zeros(len(feats), dtype=bool)
    chosen[lab] = True
    picks: list[int] = []
    rng = np.random.default_rng(seed)
    while len(picks) < budget:
        degree = (adj & ~covered[None]).sum(1)
        degree[torch.from_numpy(chosen)] = -1
        best = int(degree.argmax())
        if int(degree[best]) <= 0:
            rest = np.where(~chosen)[0]
            fill = rng.permutation(rest)[: budget - len(picks)]
            picks.extend(int(i) for i in fill)
            break
        picks.append(best)
        chosen[best] = True
        covered |= adj[best]
    return np.asarray(picks, dtype=np.int64)


def purity_radius(features: np.ndarray, num_classes: int, alpha: float = 0.95, seed: int = 0,
                  candidates: Optional[Sequence[float]] = None, chunk: int = 2048) -> float:
    """ProbCover's delta: the largest candidate radius whose purity is at least ``alpha``.

    Purity(delta) = the fraction of points whose delta-ball holds only points of their own k-means pseudo-label
    (k = ``num_classes``). Candidates default to 40 radii, geometrically spaced from half the closest pair's
    distance to the median pairwise distance (estimated on at most 2000 rows). Raises ValueError when no candidate reaches ``alpha``.
    """
    feats = np.asarray(features, dtype=np.float32)
    labels = torch.from_numpy(KMeans(n_clusters=num_classes, n_init=1, random_state=seed).fit_predict(feats))
    x = torch.from_numpy(feats).double()
    n = len(x)
    if candidates is None:
        # radius range from (at most) 2000 rows, so memory stays O(2000 * N)
        rows = np.sort(np.random.default_rng(seed).permutation(n)[:2000])
        d = torch.cdist(x[rows], x)
        d[torch.arange(len(rows)), torch.from_numpy(rows)] = float("nan")  # not the point itself
        off = d[~torch.isnan(d)]
        hi = torch.quantile(off[:10_000_000], 0.5).item()
        lo = max(0.5 * off.min().item(), 1e-3 * hi)  # below the closest pair every ball is pure
        candidates = np.geomspace(lo, hi, 40).tolist()
    radii = torch.tensor(sorted(candidates), dtype=torch.float64)
    impure = torch.zeros(len(radii), dtype=torch.float64)
    for s in range(0, n, chunk):
        d = torch.cdist(x[s:s + chunk], x)  # (r, N)
        other = labels[s:s + chunk, None] != labels[None]
        # a ball is impure iff its nearest point of another pseudo-label lies inside it
        nearest_other = torch.where(other, d, torch.full_like(d, float("inf"))).min(1).values  # (r,)
        impure += (nearest_other[None] < radii[:, None]).sum(1)
    purity = 1 - impure / n
    ok = torch.nonzero(purity >= alpha).flatten()
    if len(ok) == 0:
        raise ValueError(f"no candidate radius reaches purity {alpha} with {num_classes} pseudo-classes")
    return float(radii[ok[-1]])


def nested_selection(strategy: Strategy, features: np.ndarray, budgets: Sequence[int], seed: int = 0,
                     **kwargs: object) -> np.ndarray:
    """One selection order whose first B entries are the selection for every budget B in ``budgets``.

    Budgets are served ascending: budget B_k adds ``B_k - B_{k-1}`` picks with the earlier picks as labelled set.
    """
    if not budgets:
        raise ValueError("no budget given")
    order = np.zeros(0, dtype=np.int64)
    for budget in sorted(set(int(b) for b in budgets)):
        if budget > len(features):
            raise ValueError(f"budget {budget} is larger than the pool ({len(features)} samples)")
        extra = strategy(features, budget - len(order), labelled=order, seed=seed, **kwargs)
        order = np.concatenate([order, np.asarray(extra, dtype=np.int64)])
    return order
