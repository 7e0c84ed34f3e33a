"""AVSBench M_J / M_F: official per-call semantics, the reference vector, both aggregations, DDP parity."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch

from avmoe.metrics import AVSMetric, avs_f_measure, avs_mask_iou


# ---- a line-by-line transcription of the official functions (AVSBench avs_s4/utils/utility.py), CPU --------------
def official_mask_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> float:
    n, num_pixels = pred.size(0), pred.size(-1) * pred.size(-2)
    no_obj_flag = target.sum(2).sum(1) == 0
    pred = (torch.sigmoid(pred) > 0.5).int()
    inter = (pred * target).sum(2).sum(1)
    union = torch.max(pred, target).sum(2).sum(1)
    inter_no_obj = ((1 - target) * (1 - pred)).sum(2).sum(1)
    inter[no_obj_flag] = inter_no_obj[no_obj_flag]
    union[no_obj_flag] = num_pixels
    return (torch.sum(inter / (union + eps)) / n).item()


def official_f_measure(pred: torch.Tensor, gt: torch.Tensor, pr_num: int = 255) -> float:
    pred = torch.sigmoid(pred)
    beta2, avg_f, img_num, score = 0.3, 0.0, 0, torch.zeros(pr_num)
    for img_id in range(pred.size(0)):
        if torch.mean(gt[img_id]) == 0.0:
            continue
        prec, recall = torch.zeros(pr_num), torch.zeros(pr_num)
        thlist = torch.linspace(0, 1 - 1e-10, pr_num)
        for i in range(pr_num):
            y_temp = (pred[img_id] >= thlist[i]).float()
            tp = (y_temp * gt[img_id]).sum()
            prec[i], recall[i] = tp / (y_temp.sum() + 1e-20), tp / (gt[img_id].sum() + 1e-20)
        f_score = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f_score[f_score != f_score] = 0
        avg_f += f_score
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def reference_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-checked: 3 frames 4x4."""
    logits, gt = torch.full((3, 4, 4), -4.0), torch.zeros(3, 4, 4)
    gt[0, :2, :2] = 1  # top-left 2x2
    gt[1, :, :2] = 1  # columns 0-1; frame 2 empty
    logits[0, :2, :3] = 2.0
    logits[1, :, 0], logits[1, :, 1] = 0.5, -0.2
    logits[2, 0, 0] = 3.0
    return logits, gt


def test_reference_vector():
    logits, gt = reference_case()
    assert avs_mask_iou(logits, gt) == pytest.approx(0.7013889, abs=1e-6)
    assert avs_f_measure(logits, gt) == pytest.approx(0.8611111, abs=1e-6)


def test_equals_the_official_functions_exactly():
    g = torch.Generator().manual_seed(0)
    for k in range(60):
        n, h = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        logits = torch.randn(n, h, h, generator=g) * float(torch.rand(1, generator=g) * 6)
        if k % 4 == 0:
            logits = logits.round()  # values on the sigmoid(0) = 0.5 boundary and repeated scores
        target = (torch.rand(n, h, h, generator=g) < torch.rand(1, generator=g)).float()
        if k % 3 == 0:
            target[0] = 0  # an empty-GT frame among others
        if k % 10 == 0:
            target[:] = 0  # every frame empty
        assert avs_mask_iou(logits, target) == official_mask_iou(logits, target)
        assert avs_f_measure(logits, target) == official_f_measure(logits, target)


def test_official_edge_cases():
    empty = torch.zeros(2, 4, 4)
    assert avs_f_measure(torch.randn(2, 4, 4), empty) == 0.0  # all frames empty -> 0
    assert avs_mask_iou(torch.full((1, 4, 4), -5.0), empty[:1]) == pytest.approx(1.0, abs=1e-6)  # TN / HW
    assert avs_mask_iou(torch.full((1, 4, 4), 5.0), empty[:1]) == 0.0
    full = torch.ones(1, 4, 4)
    assert avs_mask_iou(torch.zeros(1, 4, 4), full) == 0.0  # logit 0 -> sigmoid 0.5 -> background (strict >)
    with pytest.raises(ValueError, match="same shape"):
        avs_mask_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


def _clips(n: int, seed: int = 1, t: int = 5, h: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, t, h, h, generator=g) < 0.3).float()
    target[1, 2] = 0  # empty-GT frames
    target[5] = 0  # an all-empty clip
    logits = torch.randn(n, t, h, h, generator=g) * 2 + (target * 2 - 1)
    return logits, target


def test_metric_official_and_per_frame_aggregation():
    n = 10
    logits, target = _clips(n)
    valid = torch.ones(n, 5, dtype=torch.bool)
    valid[0, 1:] = False  # S4-train-like clip: only frame 1 annotated
    metric = AVSMetric()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))  # any loader order / batch size
    for chunk in order.split(3):
        metric.update(chunk, logits[chunk], target[chunk], valid[chunk])
    out = metric.compute()

    def frames(clips: range) -> tuple[torch.Tensor, torch.Tensor]:
        sel = [(c, t) for c in clips for t in range(5) if valid[c, t]]
        return torch.stack([logits[c, t] for c, t in sel]), torch.stack([target[c, t] for c, t in sel])

    calls = [frames(range(s, min(s + 4, n))) for s in range(0, n, 4)]  # batches of 4 clips, dataset order
    mj = sum(avs_mask_iou(*c) for c in calls) / len(calls)
    mf = sum(avs_f_measure(*c) for c in calls) / len(calls)
    assert out["mj"].item() == pytest.approx(mj, abs=1e-6)
    assert out["mf"].item() == pytest.approx(mf, abs=1e-6)
    all_logits, all_target = frames(range(n))
    assert out["mj_frame"].item() == pytest.approx(avs_mask_iou(all_logits, all_target), abs=1e-6)
    assert out["mf_frame"].item() == pytest.approx(avs_f_measure(all_logits, all_target), abs=1e-5)
    assert out["mf"].item() != pytest.approx(out["mf_frame"].item(), abs=1e-4)  # MF depends on the batching

    one_batch = AVSMetric(clips_per_batch=n)  # a single official call over everything == per-frame numbers
    one_batch.update(torch.arange(n), logits, target, valid)
    assert one_batch.compute()["mf"].item() == pytest.approx(out["mf_frame"].item(), abs=1e-5)


def test_metric_counts_each_clip_once():
    logits, target = _clips(6)
    valid = torch.ones(6, 5, dtype=torch.bool)
    once, twice = AVSMetric(), AVSMetric()
    once.update(torch.arange(6), logits, target, valid)
    twice.update(torch.arange(6), logits, target, valid)
    twice.update(torch.tensor([4, 5]), logits[4:], target[4:], valid[4:])  # DistributedSampler padding repeats
    for key, value in once.compute().items():
        assert twice.compute()[key].item() == pytest.approx(value.item(), abs=1e-7), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: compute() before update()
        empty = AVSMetric().compute()
    assert all(v.item() == 0.0 for v in empty.values())


# ---- DDP: two gloo processes with padded shards give the single-process numbers ------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = 11
        logits, target = _clips(n)
        valid = torch.ones(n, 5, dtype=torch.bool)
        padded = torch.cat([torch.arange(n), torch.arange(1)])  # DistributedSampler pads 11 -> 12
        shard = padded[rank::world]
        metric = AVSMetric()
        for chunk in shard.split(2):
            metric.update(chunk, logits[chunk], target[chunk], valid[chunk])
        out = {k: v.item() for k, v in metric.compute().items()}
        if rank == 0:
            queue.put(out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_metric_ddp_matches_single_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    ddp = queue.get()
    logits, target = _clips(11)
    single = AVSMetric()
    single.update(torch.arange(11), logits, target, torch.ones(11, 5, dtype=torch.bool))
    for key, value in single.compute().items():
        assert ddp[key] == pytest.approx(value.item(), abs=1e-6), key
