"""Cold-start baselines and MMCSAL on hand-checked examples and synthetic pools (no decoding, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from avmoe.select import baselines as B
from avmoe.select.mmcsal import Stage2Config, mmcsal_select
from avmoe.select.stage1 import Stage1Config, embed, modality_gap, train_stage1
from avmoe.select.strategies import STRATEGIES, select_order
from avmoe.select.synthetic import synthetic_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def line(*xs: float) -> np.ndarray:
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def test_random_is_a_seeded_permutation_without_the_labelled():
    x = line(*range(10))
    a, b = B.random_select(x, 4, seed=3), B.random_select(x, 4, seed=3)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 4
    assert not np.array_equal(a, B.random_select(x, 4, seed=4))
    assert np.array_equal(a, np.random.default_rng(3).permutation(10)[:4])
    c = B.random_select(x, 3, labelled=a[:2], seed=3)
    assert not set(c.tolist()) & set(a[:2].tolist())


def test_kmeans_takes_the_point_nearest_each_centroid():
    # two clusters; the centroids are 0.1 and 10.1 -> points 1 (0.1) and 4 (10.1), larger cluster first
    x = line(0.0, 0.1, 0.2, 10.0, 10.1, 10.2, 10.1)
    picks = B.kmeans_select(x, 2, seed=0)
    assert sorted(picks.tolist()) in ([1, 4], [1, 6])
    assert picks[0] in (4, 6)  # the 4-point cluster comes first


def test_kcenter_greedy_needs_and_uses_an_explicit_first_centre():
    x = line(0.0, 1.0, 2.0, 10.0)
    # mean 3.25 -> nearest point 2.0 (index 2); then the farthest from it, 10.0; then 0.0
    assert B.kcenter_greedy(x, 3, first="mean").tolist() == [2, 3, 0]
    rnd = B.kcenter_greedy(x, 3, first="random", seed=0)
    assert rnd[0] == np.random.default_rng(0).integers(4) and len(set(rnd.tolist())) == 3
    # with a labelled point (warm start) no first centre is invented: farthest from 10.0 is 0.0
    assert B.kcenter_greedy(x, 2, labelled=np.array([3])).tolist() == [0, 2]
    with pytest.raises(ValueError, match="first"):
        B.kcenter_greedy(x, 1, first="nearest")


def test_typiclust_picks_the_densest_point_of_each_cluster_largest_first():
    small = [0.0, -1.0, 1.0, -2.0, 2.0, -3.0, 3.0]  # 7 points: the middle is the most typical
    big = [100.0, 99.5, 100.5, 98.0, 102.0, 96.0, 104.0, 94.0]  # 8 points, k = 4: 100 -> (.25+.25+4+4)/4
    x = line(*small, *big)
    picks = B.typiclust_select(x, 2, seed=0)
    assert picks.tolist() == [7, 0]
    # typicality = 1 / (mean squared distance to the k nearest + 1e-5): point 0.0, k=3 -> (1 + 1 + 4) / 3
    assert B.typicality(line(*small), 3)[0] == pytest.approx(1 / (2.0 + 1e-5))


def test_probcover_greedy_max_coverage_and_purity_radius():
    x = line(0.0, 0.5, 1.0, 5.0, 5.4)
    # balls (delta 0.6): 0.5 covers 3 points, then 5.0 / 5.4 cover 2 (tie -> lower index)
    assert B.probcover_select(x, 2, delta=0.6).tolist() == [1, 3]
    third = B.probcover_select(x, 3, delta=0.6, seed=0)
    assert third[:2].tolist() == [1, 3] and third[2] in (0, 2, 4)  # all covered: random fill
    # labelled point 1 already covers 0, 0.5, 1.0
    assert B.probcover_select(x, 1, labelled=np.array([1]), delta=0.6).tolist() == [3]
    two = np.concatenate([np.random.default_rng(0).normal(0, 0.1, (20, 2)),
                          np.random.default_rng(1).normal(5, 0.1, (20, 2))]).astype(np.float32)
    delta = B.purity_radius(two, num_classes=2, alpha=1.0)  # (alpha 0.95 tolerates 2 of 40 impure balls)
    cross = np.linalg.norm(two[:20, None].astype(np.float64) - two[None, 20:], axis=-1).min()
    assert 0 < delta <= cross + 1e-9  # pure balls (strict "<") never reach the other cluster
    assert B.purity_radius(two, num_classes=2, candidates=[0.5, cross + 0.5, 100.0]) == 0.5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_deterministic_and_nested(strategy):
    pool = synthetic_pool(60, num_classes=3, seed=1)
    order = select_order(strategy, pool.audio, pool.visual, [5, 12], seed=0)
    assert len(order) == 12 and len(set(order.tolist())) == 12
    assert np.array_equal(order, select_order(strategy, pool.audio, pool.visual, [5, 12], seed=0))
    assert np.array_equal(order[:5], select_order(strategy, pool.audio, pool.visual, [5], seed=0))


def test_bad_budgets_and_empty_pools_are_errors():
    pool = synthetic_pool(10, seed=0)
    with pytest.raises(ValueError, match="larger than the pool"):
        select_order("kcenter", pool.audio, pool.visual, [11], seed=0)
    with pytest.raises(ValueError, match="empty"):
        select_order("random", pool.audio[:0], pool.visual[:0], [1], seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        B.typiclust_select(pool.audio, 8, labelled=np.arange(5))


def test_mmcsal_alignment_term_avoids_off_screen_sound():
    pool = synthetic_pool(200, num_classes=4, mismatch_rate=0.3, gap=0.0, seed=2)
    feats = np.concatenate([pool.audio, pool.visual], 1)
    aligned = Stage2Config(typicality_weight=0.0, diversity_weight=0.0, alignment_weight=1.0)
    # with the same raw space for both modalities, alignment = cosine of the pair's own audio and visual
    with_align = mmcsal_select(feats, 20, audio_dim=pool.audio.shape[1], config=aligned)
    top = np.argsort(-(B_cos(pool.audio, pool.visual)), kind="stable")[:20]
    assert sorted(with_align.tolist()) == sorted(top.tolist())
    assert pool.mismatched[with_align].mean() < pool.mismatched.mean()


def B_cos(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return (a * v).sum(1)


def test_mmcsal_diversity_spreads_the_picks_over_clusters():
    ang = np.array([0.0, 0.01, 0.02, 1.5, 1.51])  # two groups of directions; both modalities identical
    circ = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    feats = np.concatenate([circ, circ], 1)
    div_only = Stage2Config(typicality_weight=0.0, diversity_weight=1.0, alignment_weight=0.0)
    picks = mmcsal_select(feats, 2, audio_dim=2, config=div_only)
    assert picks[0] in (0, 1, 2) and picks[1] in (3, 4)  # the second pick crosses to the far group


def test_prototypes_shrink_the_modality_gap_on_a_synthetic_pool():
    pool = synthetic_pool(400, num_classes=5, gap=3.0, seed=0)
    gaps = {}
    for weight in (0.0, 1.0):
        log: list[dict] = []
        cfg = Stage1Config(epochs=15, batch_size=100, proto_weight=weight, dim=32, hidden=64, num_prototypes=5)
        heads = train_stage1(pool.audio, pool.visual, cfg, seed=0, log=log)
        gaps[weight] = modality_gap(*embed(heads, pool.audio, pool.visual))
        assert log[0]["epoch"] == -1 and gaps[weight] == pytest.approx(log[-1]["gap"], abs=1e-6)
        assert gaps[weight] < log[0]["gap"]
    assert gaps[1.0] < gaps[0.0] - 0.05  # measured 0.76 vs 0.92


def test_bench_runs_at_smoke_scale():
    from bench import active_learning

    out = active_learning.main(["--seeds", "0", "--pool", "120", "--test", "100", "--classes", "4", "--budgets", "4",
                                "8", "--stage1-epochs", "2", "--variants", "random", "mmcsal", "--no-write"])
    assert set(out["acc"]) == {(v, b) for v in ("random", "mmcsal") for b in (4, 8)}
    assert all(0 <= r["acc"] <= 1 for rows in out["acc"].values() for r in rows)
    assert out["gap"][0]["before"] > 0
