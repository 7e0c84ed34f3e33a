"""Time the AVE training step of AVMoE (backbone + head + losses + Adam step), no data loading.

Paper scale by default (Swin-V2-L/192 + HTS-AT tiny, official AVE adapters, random weights), batches of 2 and 8
clips (20 and 80 frames), fp32 and bf16 autocast. Reports frames/s and peak GPU memory as a markdown table.

    python bench/train_step.py                       # on a GPU: the BENCHMARKS.md table
    python bench/train_step.py --tiny --device cpu   # smoke run of the same code path (tests use this)

Reference for scale (official AVMoE code on an H100, random weights, no data loading): 84 frames/s (8 clips,
fp32, 51.3 GiB peak), 101 frames/s (8 clips, bf16 autocast, 43.5 GiB), 40 frames/s (2 clips, fp32, 14.5 GiB).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from avmoe.models.config import AVMoEConfig
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.presets import tiny_config
from avmoe.tasks.ave import AVETask
from avmoe.tasks.base import OptimConfig

T = 10  # segments per AVE clip


@dataclass
class Result:
    clips: int
    precision: str
    frames_per_s: float
    s_per_step: float
    peak_gib: float


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


def step(task: AVETask, opt: torch.optim.Optimizer, batch: dict, precision: str) -> None:
    device_type = batch["video"].device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    with ctx:
        feats, out = task(batch)
        loss = torch.stack(list(task.compute_losses(out, batch).values())).sum() + feats.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(task: AVETask, clips: int, precision: str, warmup: int, iters: int) -> Result:
    device = next(task.parameters()).device
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(task, clips, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(task, opt, batch, precision)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step(task, opt, batch, precision)
    sync()
    took = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return Result(clips, precision, clips * T / took, took, peak)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test of the code path)")
    parser.add_argument("--clips", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    task = make_task(args.tiny, device)
    results = [measure(task, c, p, args.warmup, args.iters) for c in args.clips for p in args.precision]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"| device | clips (frames) | precision | frames/s | s/step | peak GiB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {name} | {r.clips} ({r.clips * T}) | {r.precision} | {r.frames_per_s:.1f} | {r.s_per_step:.3f} "
              f"| {r.peak_gib:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ | {"device": name} for r in results], f, indent=2)
    return results


if __name__ == "__main__":
    main()
