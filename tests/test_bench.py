"""The benchmark scripts run (their numbers live in bench/BENCHMARKS.md, never in assertions on speed)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import train_step


def test_train_step_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    results = train_step.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true", "bf16-mixed",
                               "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert [r.precision for r in results] == ["32-true", "bf16-mixed"]
    assert all(r.frames_per_s > 0 and r.s_per_step > 0 for r in results)
    assert json.loads(out.read_text())[0]["clips"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_step_benchmark_bf16_on_gpu():
    results = train_step.main(["--tiny", "--device", "cuda", "--clips", "2", "--warmup", "1", "--iters", "2"])
    assert all(r.peak_gib > 0 for r in results)
