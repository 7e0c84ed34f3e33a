"""Time the AVE training step of AVMoE (backbone + CMBS head + losses + Adam step), plain vs each optimisation.

One process, one model (same weights): each row switches one optimisation on top of the previous row, and the
rows are stepped in turn (round robin) so that load from other processes spreads over all of them; the median
step time is reported. Rows: ``plain`` (library attention blocks, experts one by one, for-loop Adam), ``+fast
attention`` (fused window attention with cached frozen constants: ``backbone.fast`` without its batched experts),
``+batched experts`` (the ``linear`` unimodal experts of each MoE module share one LayerNorm and one
down-projection GEMM, ``models/moe_batched.py``), ``+factored token map`` (the cross-modal experts read the mapped
other modality without materialising it where that saves FLOPs, ``models/moe_factored.py``), ``+fused Adam``,
``+oneDNN GEMM`` (the rest of ``backbone.fast``: the frozen encoders' GEMMs through oneDNN on a CPU,
``models/backbones/gemm.py``; the same as the row before on a GPU), ``+compile`` (regional
``torch.compile``: ``backbone.compile``; default on CUDA, ``--compile`` on a CPU), each precision in
``--precision``, and ``official`` (the official AVMoE AVE code from a local checkout, ``--official ROOT``; one row
per precision, ``official bf16-mixed`` under ``torch.autocast``).

    python bench/train_step.py                                       # on a GPU: the BENCHMARKS.md table
    python bench/train_step.py --device cpu --clips 1 --official /path/to/AVMOE-checkout
    python bench/train_step.py --tiny --device cpu                   # smoke run (tests use this)

Columns: median s/step, frames/s (clips x 10 / s), speed-up over ``plain``, peak memory (GPU:
``max_memory_allocated``; CPU: peak resident set size sampled during the steps), and on a GPU the model FLOP
utilisation from ``torch.utils.flop_counter`` (``--peak-tflops``, default by GPU name) and the compile time.
Reference for scale (official AVMoE code on an H100, random weights, no data loading): 84 frames/s (8 clips,
fp32, 51.3 GiB peak), 101 frames/s (8 clips, bf16 autocast, 43.5 GiB), 40 frames/s (2 clips, fp32, 14.5 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avmoe.models.config import AVMoEConfig  # noqa: E402
from avmoe.models.heads.ave import AVEHeadConfig  # noqa: E402
from avmoe.models.presets import tiny_config  # noqa: E402
from avmoe.tasks.ave import AVETask  # noqa: E402
from avmoe.tasks.base import OptimConfig  # noqa: E402
from bench.timing import round_robin  # noqa: E402

T = 10  # segments per AVE clip
PEAK_TFLOPS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0)}  # (bf16, tf32) dense


@dataclass
class Row:
    """One configuration: what is switched on (cumulative from ``plain``)."""

    name: str
    fast: bool = False
    batched: bool = False
    factored: bool = False
    fused_adam: bool = False
    onednn: bool = False
    compile: bool = False
    precision: str = "32-true"


@dataclass
class Result:
    name: str
    clips: int
    precision: str
    s_per_step: float
    frames_per_s: float
    peak_gib: float
    speedup: float = 1.0
    mfu: Optional[float] = None
    compile_s: Optional[float] = None
    times: list[float] = field(default_factory=list)


def make_task(tiny: bool, device: torch.device) -> AVETask:
    cfg = tiny_config() if tiny else AVMoEConfig()
    head = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1) if tiny \
        else AVEHeadConfig()
    return AVETask(backbone=cfg, head=head, optim=OptimConfig()).to(device).train()


def make_batch(task: AVETask, clips: int, device: torch.device) -> dict:
    cfg = task.backbone_config
    size, mels = cfg.visual.image_size, cfg.audio.num_mel_bins
    label = torch.randint(0, 29, (clips, T), device=device)
    return {
        "video": torch.randint(0, 256, (clips, T, 3, size, size), dtype=torch.uint8, device=device),
        "audio": torch.randn(clips, T, 101, mels, device=device),
        "index": torch.arange(clips, device=device), "label": label,
    }


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()


def step(task: AVETask, opt: torch.optim.Optimizer, batch: dict, precision: str) -> None:
    with autocast(batch["video"].device, precision):
        feats, out = task(batch)
        loss = torch.stack(list(task.compute_losses(out, batch).values())).sum() + feats.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def apply_row(task: AVETask, row: Row) -> None:
    """Switch the backbone's fast path, batched experts, factored token map, oneDNN GEMMs and regional compilation
    to the row's setting (same weights)."""
    backbone = task.backbone
    backbone.config.fast = row.fast
    backbone.batch_experts = row.batched
    backbone.factor_token_map = None if row.factored else False  # None: where it saves FLOPs (the default)
    backbone.onednn_gemm = row.onednn
    for unit in backbone._compiled.values():
        unit.enabled = row.compile


def rows_for(args: argparse.Namespace, device: torch.device) -> list[Row]:
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    rows = []
    for precision in args.precision:
        tag = "" if precision == "32-true" else f" {precision}"
        rows += [Row("plain" + tag, precision=precision),
                 Row("+fast attention" + tag, fast=True, precision=precision),
                 Row("+batched experts" + tag, fast=True, batched=True, precision=precision),
                 Row("+factored token map" + tag, fast=True, batched=True, factored=True, precision=precision),
                 Row("+fused Adam" + tag, fast=True, batched=True, factored=True, fused_adam=True,
                     precision=precision),
                 Row("+oneDNN GEMM" + tag, fast=True, batched=True, factored=True, fused_adam=True, onednn=True,
                     precision=precision)]
        if compile_on:
            rows.append(Row("+compile" + tag, fast=True, batched=True, factored=True, fused_adam=True, onednn=True,
                            compile=True, precision=precision))
    return rows


class PeakRSS:
    """Peak resident set size of this process, sampled every few ms in a thread (CPU memory column)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.002)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(seconds, peak GiB) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
    return took, rss.peak / 2**30


def flops_of(fn: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, precision: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if precision == "bf16-mixed" else tf32
    return None


def run_rows(
    runners: dict[str, Callable[[], None]], warmup: int, iters: int, device: torch.device
) -> dict[str, tuple[list[float], float]]:
    """Warm every runner up, then step them round robin ``iters`` times: name -> (step times, peak GiB)."""
    measured = round_robin(runners, iters, warmup, timer=lambda fn: timed(fn, device))
    return {k: ([t for t, _ in v], max((p for _, p in v), default=0.0)) for k, v in measured.items()}


def summarise(name: str, clips: int, precision: str, times: list[float], peak: float) -> Result:
    med = statistics.median(times)
    return Result(name, clips, precision, med, clips * T / med, peak, times=times)


def print_table(results: list[Result], device_name: str, gpu: bool) -> None:
    head = "| device | row | clips (frames) | precision | s/step (median) | frames/s | vs plain | peak GiB |"
    sep = "|---|---|---|---|---|---|---|---|"
    if gpu:
        head, sep = head + " MFU | compile s |", sep + "---|---|"
    print(head + "\n" + sep)
    for r in results:
        line = (f"| {device_name} | {r.name} | {r.clips} ({r.clips * T}) | {r.precision} | {r.s_per_step:.3f} "
                f"| {r.frames_per_s:.1f} | {r.speedup:.2f}x | {r.peak_gib:.2f} |")
        if gpu:
            mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
            comp = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
            line += f" {mfu} | {comp} |"
        print(line)


def print_vs_official(results: list[Result]) -> None:
    """Speed of each row relative to each official row at the same batch (official s/step / row s/step)."""
    for clips in sorted({r.clips for r in results}):
        same = [r for r in results if r.clips == clips]
        for official in (r for r in same if r.name.startswith("official")):
            ratios = ", ".join(f"{r.name}: {official.s_per_step / r.s_per_step:.2f}x"
                               f" ({statistics.median(o / t for o, t in zip(official.times, r.times)):.2f}x)"
                               for r in same if not r.name.startswith("official"))
            print(f"vs {official.name} at {clips} clip(s) (official s/step / row s/step; in brackets the median "
                  f"of the per-round ratios, steadier where the machine's speed drifts): {ratios}")


def parser_for(doc: str, clips: list[int]) -> argparse.ArgumentParser:
    """The command line shared by the training-step and inference benchmarks."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test of the code path)")
    parser.add_argument("--clips", type=int, nargs="+", default=clips)
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add the +compile row (default: on CUDA only)")
    parser.add_argument("--official", help="root of a checkout of the official AVMoE code: adds its rows (one per --precision, one shared model)")
    parser.add_argument("--rows", nargs="+", metavar="NAME",
                        help="time only these avmoe rows (e.g. '+fused Adam'); the official rows are kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="GPU peak for MFU (default: by GPU name)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    return parser


def device_for(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 rows (as the GPU presets intend)
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    return device


def measure(
    task: AVETask, rows: list[Row], runners: dict[str, Callable[[], None]], clips: int, device: torch.device,
    args: argparse.Namespace,
) -> list[Result]:
    """Run the rows (and ``official`` if present) round robin; results with speed-up over ``plain``, MFU, compile s."""
    compile_before = task.backbone.compile_seconds
    measured = run_rows(runners, args.warmup, args.iters, device)
    by_name = {row.name: row for row in rows}
    results = []
    for name, (times, peak) in measured.items():
        row = by_name.get(name)
        precision = row.precision if row else (name.split(" ", 1)[1] if " " in name else "32-true")  # official
        result = summarise(name, clips, precision, times, peak)
        if row and row.compile:
            result.compile_s = task.backbone.compile_seconds - compile_before
        if device.type == "cuda":
            tflops = peak_tflops(device, result.precision, args.peak_tflops)
            if tflops:
                result.mfu = flops_of(runners[name]) / result.s_per_step / (tflops * 1e12)
        results.append(result)
    base = {r.precision: r.s_per_step for r in results if r.name.startswith("plain")}
    for r in results:
        r.speedup = base.get(r.precision, base.get("32-true", r.s_per_step)) / r.s_per_step
    return results


def report(results: list[Result], device: torch.device, json_path: Optional[str]) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_table(results, name, device.type == "cuda")
    print_vs_official(results)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) | {"device": name} for r in results], f, indent=2)


def run_benchmark(
    args: argparse.Namespace, task: AVETask, device: torch.device, rows: list[Row],
    runner_for: Callable[[Row, dict], Callable[[], None]], train: bool,
) -> list[Result]:
    """Every batch size: one runner per row (plus ``official``), measured round robin, then the table."""
    if args.rows:
        unknown = set(args.rows) - {row.name for row in rows}
        if unknown:
            raise SystemExit(f"--rows: unknown row(s) {sorted(unknown)}; rows: {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in args.rows]
    results: list[Result] = []
    for clips in args.clips:
        batch = make_batch(task, clips, device)
        runners = {row.name: runner_for(row, batch) for row in rows}
        if args.official:
            from bench.official import official_runners

            runners |= official_runners(args.official, clips, T, train, args.precision, device)
        results += measure(task, rows, runners, clips, device, args)
    report(results, device, args.json)
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    args = parser_for(__doc__, [2, 8]).parse_args(argv)
    device = device_for(args)
    task = make_task(args.tiny, device)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizers: dict[bool, torch.optim.Optimizer] = {}  # rows with the same Adam share it (memory)

    def runner_for(row: Row, batch: dict) -> Callable[[], None]:
        if row.fused_adam not in optimizers:  # plain: torch's default Adam
            optimizers[row.fused_adam] = torch.optim.Adam(params, lr=1e-4, fused=row.fused_adam or None)
        opt = optimizers[row.fused_adam]

        def run() -> None:
            apply_row(task, row)
            step(task, opt, batch, row.precision)
        return run

    return run_benchmark(args, task, device, rows_for(args, device), runner_for, train=True)


if __name__ == "__main__":
    main()
