"""The benchmark scripts run (their numbers live in bench/BENCHMARKS.md, never in assertions on speed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import attention_kernel, gemm_kernels, inference, moe_experts, official, train_step
from tests.test_callbacks import imbalanced_release  # noqa: F401  (fixture)


def test_train_step_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    results = train_step.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true", "bf16-mixed",
                               "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert [r.name for r in results] == ["plain", "+fast attention", "+batched experts", "+factored token map",
                                         "+fused Adam", "+oneDNN GEMM", "plain bf16-mixed",
                                         "+fast attention bf16-mixed", "+batched experts bf16-mixed",
                                         "+factored token map bf16-mixed", "+fused Adam bf16-mixed",
                                         "+oneDNN GEMM bf16-mixed"]
    assert all(r.frames_per_s > 0 and r.s_per_step > 0 and r.peak_gib > 0 for r in results)
    assert results[0].speedup == 1.0
    assert json.loads(out.read_text())[0]["clips"] == 1


def test_rows_option_times_only_the_named_rows():
    results = inference.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true",
                              "--warmup", "0", "--iters", "2", "--rows", "+factored token map"])
    assert [r.name for r in results] == ["+factored token map"] and len(results[0].times) == 2
    with pytest.raises(SystemExit, match="unknown row"):
        inference.main(["--tiny", "--device", "cpu", "--rows", "+nothing"])


def test_inference_benchmark_runs_tiny_on_cpu():
    results = inference.main(["--tiny", "--device", "cpu", "--clips", "1", "--precision", "32-true",
                              "--warmup", "0", "--iters", "1"])
    assert [r.name for r in results] == ["plain", "+fast attention", "+batched experts", "+factored token map",
                                         "+oneDNN GEMM"]
    assert all(r.frames_per_s > 0 for r in results)


def test_attention_kernel_benchmark_uses_the_encoders_window_shapes():
    from avmoe.models.config import AVMoEConfig

    shapes = attention_kernel.window_shapes(AVMoEConfig(), frames=2)
    # Swin-V2-L/12 @192: grids 48, 24, 12, 6 (the last clamps the window to 6); HTS-AT: grids 64..8, window 8
    assert shapes[0] == ("swin", 0, 2 * 16, 6, 144, 32) and shapes[3] == ("swin", 3, 2, 48, 36, 32)
    assert shapes[4] == ("htsat", 0, 2 * 64, 4, 64, 24) and shapes[7] == ("htsat", 3, 2, 32, 64, 24)
    for kind in ("fused", "gemm"):  # both kernels run forward + backward at a real shape
        attention_kernel.runner(kind, shapes[3][2:], torch.bfloat16)()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_gemm_kernel_benchmark_uses_the_encoders_linear_shapes():
    from avmoe.models.config import AVMoEConfig

    shapes = gemm_kernels.products(AVMoEConfig(), frames=2)
    # Swin-V2-L: 48x48 tokens of width 192 at stage 0; HTS-AT: 64x64 of width 96; 4 products per stage
    assert shapes[0] == ("swin", 0, "q/k/v", 2 * 48 * 48, 192, 576) and len(shapes) == 2 * 4 * 4
    assert shapes[11] == ("swin", 2, "mlp out", 2 * 12 * 12, 3072, 768)
    assert shapes[16] == ("htsat", 0, "q/k/v", 2 * 64 * 64, 96, 288)
    runs = gemm_kernels.runners(6, 8, 4)
    assert set(runs) == set(gemm_kernels.KERNELS)
    for run in runs.values():  # every kernel runs at a real (tiny) shape
        run()


def test_official_harness_names_a_missing_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="net_trans_v3.py"):
        official.load_official_ave(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_step_benchmark_bf16_on_gpu():
    results = train_step.main(["--tiny", "--device", "cuda", "--clips", "2", "--warmup", "1", "--iters", "2"])
    assert all(r.peak_gib > 0 for r in results)
    assert any(r.name.startswith("+compile") and r.compile_s is not None for r in results)




def test_robustness_benchmark_evaluates_saved_models(tmp_path, imbalanced_release, ave_release):
    """bench/robustness.py's evaluation at the smallest scale on the session's releases, on weights saved as a
    run leaves them (``--reuse``: untrained here, CRMT with Lipschitz constants): every series goes through
    RobustEval + run_sweep, the CRMT bound is reported and written, the section names every row."""
    from bench import robustness

    (tmp_path / "imbalanced").symlink_to(imbalanced_release)  # make_release / the ablation reuse what is there
    (tmp_path / "ave").symlink_to(ave_release)
    crmt = robustness.train_method("crmt", 0, None, None, 1, 1e-3, 1, 1)  # out=None: the architecture only
    crmt.crmt_fusion.lipschitz.fill_(1.0)
    for name, task in (("crmt_s0", crmt), ("uni_only_s0", robustness.train_ablation("uni_only", 0, None, None, 1,
                                                                                      1e-3))):
        (tmp_path / "runs" / name).mkdir(parents=True)
        torch.save({"state_dict": task.state_dict(), "train_s": 0.0}, tmp_path / "runs" / name / "model.pt")
    body = robustness.main(["--out", str(tmp_path), "--methods", "crmt", "--ablation", "uni_only", "--seeds", "0",
                            "--severities", "1", "--radii", "1", "--reuse", "--no-write"])
    crmt, ablation = [json.loads(line) for line in (tmp_path / "robustness_results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["value"]) for r in crmt["rows"]] == [
        ("missing_audio", 1.0), ("missing_visual", 1.0), ("visual_gaussian_blur", 1), ("clean_subset_1", None),
        ("pgd_visual", 1.0), ("clean_subset_2", None), ("audio_white_noise", 1)]
    assert math.isfinite(crmt["clean"]["test/crmt_bound"])  # reported by the CRMT callback at test
    assert (tmp_path / "runs" / "crmt_s0" / "metrics" / "crmt_bound_test.csv").is_file()
    assert [r["name"] for r in ablation["rows"]] == ["visual_only"]
    assert "CRMT (stage 1 + stage 2)" in body and "unimodal experts only" in body


def test_moe_experts_benchmark_times_plain_batched_and_factored():
    """One small paper-scale shape (AVQA, stage 2, 1 frame): the three computations are checked equal inside,
    then timed; AVQA's 2 latents factor there."""
    rows = moe_experts.main(["--configs", "avqa", "--stages", "2", "--frames", "1", "--rounds", "1"])
    assert [(r["config"], r["stage"], r["side"]) for r in rows] == [("avqa", 2, "a"), ("avqa", 2, "v")]
    assert all(r[k] > 0 for r in rows for k in ("plain", "batched", "factored"))
