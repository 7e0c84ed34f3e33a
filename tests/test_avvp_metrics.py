"""AVVP metrics: the reference vectors of the official eval_metrics.py, the event-matching rule, an independent
loop oracle, the official thresholding, per-video averaging and each video counted once (also under DDP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avmoe.metrics import AVVPMetric, avvp_event_level, avvp_predictions, avvp_segment_level
from avmoe.metrics.avvp import METRIC_NAMES, event_counts, segment_counts

C, T = 25, 10


def case_a() -> tuple[np.ndarray, ...]:
    """Hand-checked case A (everything else zero)."""
    gt_a, gt_v, so_a, so_v = (np.zeros((C, T)) for _ in range(4))
    gt_a[0, 0:4] = 1
    gt_a[3, 6:10] = 1
    gt_v[0, 0:10] = 1
    so_a[0, 0:2] = 1
    so_a[0, 3:6] = 1
    so_a[5, 9] = 1
    so_v[0, 2:10] = 1
    return so_a, so_v, gt_a, gt_v


@pytest.mark.parametrize("as_torch", [False, True])
def test_reference_vectors_of_the_official_code(as_torch):
    arrays = case_a()
    if as_torch:
        arrays = tuple(torch.from_numpy(a).to(torch.int64) for a in arrays)
    assert avvp_segment_level(*arrays) == pytest.approx((0.222222, 0.888889, 0.271605, 0.285714), abs=1e-6)
    assert avvp_event_level(*arrays) == pytest.approx((0.222222, 1.0, 0.266667, 0.0), abs=1e-6)


def test_all_negative_scores_one_and_single_false_positive():
    zero = np.zeros((C, T))
    assert avvp_segment_level(zero, zero, zero, zero) == (1.0, 1.0, 1.0, 1.0)
    assert avvp_event_level(zero, zero, zero, zero) == (1.0, 1.0, 1.0, 1.0)
    fp = zero.copy()
    fp[7, 4] = 1
    assert avvp_segment_level(fp, zero, zero, zero) == (0.0, 1.0, 0.0, 1.0)
    assert avvp_event_level(fp.astype(bool), zero, zero, zero) == (0.0, 1.0, 0.0, 1.0)


def _row(*runs: tuple[int, int]) -> torch.Tensor:
    x = torch.zeros(1, T, dtype=torch.float64)
    for s, e in runs:
        x[0, s:e] = 1
    return x


def test_event_matching_is_iou_half_against_any_event_not_one_to_one():
    tp, fp, fn = event_counts(_row((0, 2), (3, 6)), _row((0, 6)))  # [3,6) matches [0,6) at IoU 0.5; [0,2) does not
    assert (tp.item(), fp.item(), fn.item()) == (1, 1, 0)
    tp, fp, fn = event_counts(_row((0, 5)), _row((0, 3), (4, 6)))  # [0,5) vs [0,3): IoU 0.6; vs [4,6): 1/6
    assert (tp.item(), fp.item(), fn.item()) == (1, 0, 1)
    tp, fp, fn = event_counts(_row((0, 4)), _row((0, 2), (2, 4)))  # adjacent GT runs merge into one event
    assert (tp.item(), fp.item(), fn.item()) == (1, 0, 0)
    tp, fp, fn = event_counts(_row((9, 10)), _row((8, 10)))  # a run ending at the last segment; IoU exactly 0.5
    assert (tp.item(), fp.item(), fn.item()) == (1, 0, 0)


# ------------------------------------------------------------------------------------------- loop oracle


def _oracle_f(tp: list[float], fp: list[float], fn: list[float]) -> float:
    scores = [2 * a / (2 * a + b + c) for a, b, c in zip(tp, fp, fn) if a + b > 0 or a + c > 0]
    return sum(scores) / len(scores) if scores else 1.0


def _oracle_runs(seq: np.ndarray) -> list[set[int]]:
    runs, current = [], set()
    for i, value in enumerate(seq):
        if value:
            current.add(i)
        elif current:
            runs, current = runs + [current], set()
    return runs + [current] if current else runs


def _oracle_event_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    p, g = _oracle_runs(pred), _oracle_runs(gt)
    hit = lambda x, y: len(x & y) >= 0.5 * len(x | y)  # noqa: E731
    tp = sum(any(hit(x, y) for y in g) for x in p)
    fn = sum(not any(hit(y, x) for x in p) for y in g)
    return tp, len(p) - tp, fn


def _oracle_segment_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    return float((pred * gt).sum()), float((pred * (1 - gt)).sum()), float(((1 - pred) * gt).sum())


def _oracle(counts, pa, pv, ga, gv) -> tuple[float, ...]:
    per = {name: [counts(p[c], g[c]) for c in range(C)]
           for name, p, g in (("a", pa, ga), ("v", pv, gv), ("av", pa * pv, ga * gv))}
    f = {k: _oracle_f(*zip(*v)) for k, v in per.items()}
    pooled = [tuple(x + y for x, y in zip(a, v)) for a, v in zip(per["a"], per["v"])]
    return f["a"], f["v"], _oracle_f(*zip(*pooled)), f["av"]


def _random_video(rng: np.random.Generator) -> list[np.ndarray]:
    """Sparse 25x10 arrays: a few active classes with random runs, as in LLP."""
    out = []
    for _ in range(4):
        x = np.zeros((C, T))
        for c in rng.choice(C, rng.integers(0, 4), replace=False):
            x[c] = rng.random(T) < rng.uniform(0.2, 0.9)
        out.append(x)
    return out


def test_vectorised_functions_equal_a_loop_oracle_on_random_videos():
    rng = np.random.default_rng(0)
    for _ in range(150):
        video = _random_video(rng)
        if rng.random() < 0.3:
            video[2], video[3] = video[0].copy(), video[1].copy()  # perfect predictions
        assert avvp_segment_level(*video) == pytest.approx(_oracle(_oracle_segment_counts, *video), abs=1e-12)
        assert avvp_event_level(*video) == pytest.approx(_oracle(_oracle_event_counts, *video), abs=1e-12)


def test_bad_inputs_are_errors():
    zero = np.zeros((C, T))
    with pytest.raises(ValueError, match="binary"):
        avvp_segment_level(zero + 0.5, zero, zero, zero)
    with pytest.raises(ValueError, match="one shape"):
        avvp_event_level(zero, zero, zero, np.zeros((C, T - 1)))


# ------------------------------------------------------------------------------------------- thresholding + metric


def test_official_thresholding_masks_segments_by_predicted_video_labels():
    global_prob = torch.tensor([[0.5, 0.49, 0.9]])
    seg = torch.full((1, 3, T), 0.7)
    seg[0, 2, :5] = 0.2
    audio, visual = avvp_predictions(global_prob, seg, seg.flip(-1))
    assert audio[0, 0].sum() == T  # p >= 0.5 counts as positive, at both levels
    assert audio[0, 1].sum() == 0  # segment probability 0.7 but the video-level label is not predicted
    assert audio[0, 2].tolist() == [0.0] * 5 + [1.0] * 5
    assert visual[0, 2].tolist() == [1.0] * 5 + [0.0] * 5


def _probs_for(pred_audio: torch.Tensor, pred_visual: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Model outputs whose official thresholding gives exactly these binary predictions."""
    video = ((pred_audio + pred_visual).sum(-1) > 0).float()  # (B, C)
    return 0.2 + 0.6 * video, 0.2 + 0.6 * pred_audio, 0.2 + 0.6 * pred_visual


def test_metric_averages_per_video_and_counts_each_video_once():
    rng = np.random.default_rng(1)
    videos = [_random_video(rng) for _ in range(5)]
    pa, pv, ga, gv = (torch.tensor(np.stack([v[i] for v in videos]), dtype=torch.float32) for i in range(4))
    metric = AVVPMetric()
    glob, a_prob, v_prob = _probs_for(pa, pv)
    metric.update(torch.arange(3), glob[:3], a_prob[:3], v_prob[:3], ga[:3], gv[:3])
    metric.update(torch.tensor([3, 4, 0]), glob[[3, 4, 0]], a_prob[[3, 4, 0]], v_prob[[3, 4, 0]],
                  ga[[3, 4, 0]], gv[[3, 4, 0]])  # video 0 again: DistributedSampler padding
    out = metric.compute()
    assert set(out) == set(METRIC_NAMES)
    seg = np.array([avvp_segment_level(pa[i], pv[i], ga[i], gv[i]) for i in range(5)]).mean(0)
    evt = np.array([avvp_event_level(pa[i], pv[i], ga[i], gv[i]) for i in range(5)]).mean(0)
    for level, (a, v, event, av) in (("segment", seg), ("event", evt)):
        assert out[f"{level}_audio"].item() == pytest.approx(a, abs=1e-6)
        assert out[f"{level}_visual"].item() == pytest.approx(v, abs=1e-6)
        assert out[f"{level}_av"].item() == pytest.approx(av, abs=1e-6)
        assert out[f"{level}_event"].item() == pytest.approx(event, abs=1e-6)
        assert out[f"{level}_type"].item() == pytest.approx((a + v + av) / 3, abs=1e-6)


def test_segment_counts_shape_is_per_class():
    tp, fp, fn = segment_counts(torch.ones(2, C, T), torch.zeros(2, C, T))
    assert tp.shape == (2, C) and fp.sum() == 2 * C * T and fn.sum() == 0


# ------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, store: str, result: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rng = np.random.default_rng(2)
    videos = [_random_video(rng) for _ in range(5)]
    pa, pv, ga, gv = (torch.tensor(np.stack([v[i] for v in videos]), dtype=torch.float32) for i in range(4))
    glob, a_prob, v_prob = _probs_for(pa, pv)
    # A DistributedSampler over 5 videos on 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and pads with 0.
    idx = torch.tensor([[0, 2, 4], [1, 3, 0]][rank])
    metric = AVVPMetric()
    metric.update(idx, glob[idx], a_prob[idx], v_prob[idx], ga[idx], gv[idx])
    out = metric.compute()
    if rank == 0:
        torch.save({k: v.item() for k, v in out.items()}, result)
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_each_video_counts_once(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    ddp = torch.load(result, weights_only=True)
    rng = np.random.default_rng(2)
    videos = [_random_video(rng) for _ in range(5)]
    seg = np.array([avvp_segment_level(*v) for v in videos]).mean(0)
    assert ddp["segment_audio"] == pytest.approx(seg[0], abs=1e-6)
    assert ddp["segment_type"] == pytest.approx((seg[0] + seg[1] + seg[3]) / 3, abs=1e-6)
