"""The benchmark scripts run (their numbers live in bench/BENCHMARKS.md, never in assertions on speed)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import inference, official, train_step


def test_train_step_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    results = train_step.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true", "bf16-mixed",
                               "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert [r.name for r in results] == ["plain", "+fast attention", "+batched experts", "+fused Adam",
                                         "plain bf16-mixed", "+fast attention bf16-mixed",
                                         "+batched experts bf16-mixed", "+fused Adam bf16-mixed"]
    assert all(r.frames_per_s > 0 and r.s_per_step > 0 and r.peak_gib > 0 for r in results)
    assert results[0].speedup == 1.0
    assert json.loads(out.read_text())[0]["clips"] == 1


def test_inference_benchmark_runs_tiny_on_cpu():
    results = inference.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true",
                              "--warmup", "0", "--iters", "1"])
    assert [r.name for r in results] == ["plain", "+fast attention", "+batched experts"]
    assert all(r.frames_per_s > 0 for r in results)


def test_official_harness_names_a_missing_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="net_trans_v3.py"):
        official.load_official_ave(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_step_benchmark_bf16_on_gpu():
    results = train_step.main(["--tiny", "--device", "cuda", "--clips", "2", "--warmup", "1", "--iters", "2"])
    assert all(r.peak_gib > 0 for r in results)
    assert any(r.name.startswith("+compile") and r.compile_s is not None for r in results)
