"""MUSIC-AVQA metrics: micro accuracy per type / group / overall, parity with the official loop, DDP de-dup."""

from __future__ import annotations

import ast
import json
import os
import socket

import pytest
import torch

from avmoe.metrics.avqa import QUESTION_TYPES, AVQAAccuracy, avqa_accuracy, group_key, type_key


def official_test_loop(samples: list[dict], preds: list[int], labels: list[int]) -> dict[str, float]:
    """A line-by-line port of GeWu-Lab/MUSIC-AVQA ``main_avst.py::test`` (batch_size 1, types from the rows)."""
    a_count, a_cmp, v_count, v_loc, av_ext, av_count, av_loc, av_cmp, av_temp = ([] for _ in range(9))
    total = correct = 0
    for batch_idx, (predicted, target) in enumerate(zip(preds, labels)):
        total += 1
        correct += int(predicted == target)
        x = samples[batch_idx]
        qtype = ast.literal_eval(x["type"])
        hit = int(predicted == target)
        if qtype[0] == "Audio":
            if qtype[1] == "Counting":
                a_count.append(hit)
            elif qtype[1] == "Comparative":
                a_cmp.append(hit)
        elif qtype[0] == "Visual":
            if qtype[1] == "Counting":
                v_count.append(hit)
            elif qtype[1] == "Location":
                v_loc.append(hit)
        elif qtype[0] == "Audio-Visual":
            if qtype[1] == "Existential":
                av_ext.append(hit)
            elif qtype[1] == "Counting":
                av_count.append(hit)
            elif qtype[1] == "Location":
                av_loc.append(hit)
            elif qtype[1] == "Comparative":
                av_cmp.append(hit)
            elif qtype[1] == "Temporal":
                av_temp.append(hit)
    av = av_ext + av_count + av_loc + av_cmp + av_temp
    return {
        "acc_audio_counting": sum(a_count) / len(a_count), "acc_audio_comparative": sum(a_cmp) / len(a_cmp),
        "acc_audio": (sum(a_count) + sum(a_cmp)) / (len(a_count) + len(a_cmp)),
        "acc_visual_counting": sum(v_count) / len(v_count), "acc_visual_location": sum(v_loc) / len(v_loc),
        "acc_visual": (sum(v_count) + sum(v_loc)) / (len(v_count) + len(v_loc)),
        "acc_av_existential": sum(av_ext) / len(av_ext), "acc_av_counting": sum(av_count) / len(av_count),
        "acc_av_location": sum(av_loc) / len(av_loc), "acc_av_comparative": sum(av_cmp) / len(av_cmp),
        "acc_av_temporal": sum(av_temp) / len(av_temp), "acc_av": sum(av) / len(av),
        "acc": correct / total,
    }


def test_parity_with_official_loop_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    n = 500
    qtype = torch.randint(len(QUESTION_TYPES), (n,), generator=g)
    # Unequal type sizes and accuracies, so micro and macro means differ.
    qtype[:150] = 0
    labels = torch.randint(42, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.3 + 0.05 * qtype, labels, (labels + 1) % 42)
    samples = [{"type": json.dumps(list(QUESTION_TYPES[int(t)]))} for t in qtype]
    expected = official_test_loop(samples, preds.tolist(), labels.tolist())
    metric = AVQAAccuracy()
    for chunk in torch.arange(n).split(7):  # any batching
        metric.update(chunk, preds[chunk], labels[chunk], qtype[chunk])
    got = {k: float(v) for k, v in metric.compute().items()}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_groups_are_micro_not_macro_and_absent_types_are_left_out():
    # Audio: Counting 1/1 correct, Comparative 0/3 -> micro 1/4 (macro would be 0.5).
    qtype = torch.tensor([0, 1, 1, 1, 8])
    correct = torch.tensor([1, 0, 0, 0, 1])
    out = avqa_accuracy(correct, qtype)
    assert float(out["acc_audio"]) == pytest.approx(0.25)
    assert float(out["acc_av_temporal"]) == 1.0 and float(out["acc_av"]) == 1.0
    assert float(out["acc"]) == pytest.approx(2 / 5)
    assert "acc_visual" not in out and type_key(2) not in out  # no visual questions: no number, not a 0
    assert [type_key(i) for i in (0, 4, 8)] == ["acc_audio_counting", "acc_av_existential", "acc_av_temporal"]
    assert group_key("Audio-Visual") == "acc_av"


def test_each_question_counted_once_under_sampler_padding():
    metric = AVQAAccuracy()
    target = torch.tensor([3, 4, 5])
    metric.update(torch.tensor([0, 1]), torch.tensor([3, 0]), target[:2], torch.tensor([0, 0]))
    metric.update(torch.tensor([2, 0]), torch.tensor([5, 3]), torch.tensor([5, 3]), torch.tensor([2, 0]))  # 0 again
    out = metric.compute()
    assert float(out["acc"]) == pytest.approx(2 / 3)
    assert float(out["acc_audio_counting"]) == pytest.approx(1 / 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    # A forked child must not enter an OpenMP region the parent's thread team left behind (libgomp hangs).
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # 5 questions over 2 ranks as DistributedSampler deals them: rank 0 [0, 2, 4], rank 1 [1, 3, 0 (padding)].
        index = torch.tensor([[0, 2, 4], [1, 3, 0]][rank])
        target = torch.tensor([1, 1, 1, 1, 1])[index]
        pred = torch.tensor([1, 0, 1, 1, 0])[index]
        qtype = torch.tensor([0, 0, 2, 2, 8])[index]
        metric = AVQAAccuracy()
        metric.update(index, pred, target, qtype)
        queue.put((rank, {k: float(v) for k, v in metric.compute().items()}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_ranks_count_every_question_once():
    # fork: the children need nothing but this module's function (spawn would re-import torch, ~20 s here).
    ctx = torch.multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # never leave a hung rank behind (multiprocessing would wait for it at exit)
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    single = avqa_accuracy(torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 0, 2, 2, 8]))
    for rank in (0, 1):
        assert results[rank]["acc"] == pytest.approx(3 / 5), "the padded copy of question 0 must not count"
        assert results[rank] == pytest.approx({k: float(v) for k, v in single.items()})
