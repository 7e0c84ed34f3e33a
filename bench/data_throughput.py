"""Clips per second of each DataModule's train loader at 1, 2 and N DataLoader workers (CPU).

Writes a synthetic release per dataset in the official on-disk layout (real H.264/AAC mp4s, PNG frames, wavs;
frame side ``--size``, ``--fps``) unless it is already there, then times full decoding (frames + log-mel, the
DataModule's default image size and audio front end) through ``train_dataloader()``: the same sampler, worker
seeding and collate as training. Steady-state clips/s excludes the first batch (worker start-up); start-up is
reported separately. MUSIC-AVQA is measured without and with its decoded-clip cache.

    python bench/data_throughput.py                  # the BENCHMARKS.md table (a few minutes)
    python bench/data_throughput.py --tiny           # smoke run (tests use this)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from avmoe.datamodules.base import AVDataModule


@dataclass
class Result:
    dataset: str
    workers: int
    clips: int
    clips_per_s: float
    startup_s: float


@dataclass(frozen=True)
class Case:
    """A DataModule (``avmoe.datamodules.<datamodule>``) on a release written by ``synthetic.<writer>``."""

    name: str
    datamodule: str
    writer: str
    options: tuple[tuple[str, Any], ...] = ()


CASES = [
    Case("ave", "AVEDataModule", "write_ave_release"),
    Case("llp", "LLPDataModule", "write_llp_release"),
    Case("avsbench_s4", "AVSBenchDataModule", "write_avsbench_release"),
    Case("musicavqa", "MusicAVQADataModule", "write_musicavqa_release", (("clip_seconds", 10.0),)),
    Case("musicavqa+cache", "MusicAVQADataModule", "write_musicavqa_release",
         (("clip_seconds", 10.0), ("cache_dir", "cache"))),
]


def missing(case: Case) -> list[str]:
    """The pieces of ``case`` that do not exist (yet)."""
    import avmoe.datamodules as dms  # noqa: PLC0415
    import avmoe.datamodules.synthetic as synthetic  # noqa: PLC0415

    return [name for name, mod in ((case.datamodule, dms), (case.writer, synthetic)) if not hasattr(mod, name)]


def write_release(case: Case, root: Path, args: argparse.Namespace) -> Path:
    """The case's synthetic release under ``root`` (written once)."""
    import avmoe.datamodules.synthetic as synthetic  # noqa: PLC0415

    if root.is_dir() and any(root.iterdir()):
        return root
    write = getattr(synthetic, case.writer)
    if case.writer == "write_musicavqa_release":  # ~70 % of the questions are train questions, 3 per video
        write(root, num_videos=max(4, args.clips // 2), questions_per_video=3, size=args.size,
              fps=max(1, args.fps // 6))
    elif case.writer == "write_avsbench_release":  # PNG frames at the official 224 px
        write(root, setting="s4", num_train=args.clips, num_val=2, num_test=2)
    else:
        write(root, num_train=args.clips, num_val=2, num_test=2, size=args.size, fps=args.fps)
    return root


def make_datamodule(case: Case, root: Path, args: argparse.Namespace, workers: int) -> AVDataModule:
    import avmoe.datamodules as dms  # noqa: PLC0415

    kwargs: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": workers, "persistent_workers": False,
                              "pin_memory": False, "limit_samples": args.clips, **dict(case.options)}
    if "cache_dir" in kwargs:
        kwargs["cache_dir"] = str(root / kwargs["cache_dir"])
    return getattr(dms, case.datamodule)(str(root), **kwargs)


def measure(dm: AVDataModule) -> tuple[int, float, float]:
    """(clips, steady clips/s after the first batch, seconds to the first batch) of one train epoch."""
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - start
    clips, tic = 0, time.perf_counter()
    for batch in it:
        clips += int(batch["index"].shape[0])
    took = time.perf_counter() - tic
    del first
    return clips, clips / took if took > 0 else float("nan"), startup


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/bench_releases", help="where the generated releases live")
    parser.add_argument("--datasets", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 2 N (N = CPU count)")
    parser.add_argument("--clips", type=int, default=48, help="train clips per release (and measured per run)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224, help="frame side of the generated videos")
    parser.add_argument("--fps", type=int, default=24, help="frame rate of the generated videos")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 6 clips of 64 px at 8 fps, 1 worker")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clips, args.size, args.fps, args.batch_size = 6, 64, 8, 2
        args.workers = args.workers or [1]
    workers = sorted(set(args.workers or [1, 2, os.cpu_count() or 1]))
    torch.set_num_threads(1)  # the main process only collects; decoding happens in the workers

    results = []
    for case in (c for c in CASES if c.name in args.datasets):
        if missing(case):
            print(f"skipping {case.name}: missing {', '.join(missing(case))}")
            continue
        root = write_release(case, Path(args.root) / case.name.split("+")[0], args)
        for w in workers:
            clips, rate, startup = measure(make_datamodule(case, root, args, w))
            results.append(Result(case.name, w, clips, rate, startup))
            print(f"{case.name}: {w} worker(s): {rate:.1f} clips/s ({clips} clips), first batch {startup:.2f} s",
                  flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{platform.machine()} CPU, {os.cpu_count()} cores, load average {load:.1f}; batch {args.batch_size}, "
          f"{args.size} px {args.fps} fps videos\n")
    print("| dataset | workers | clips/s | first batch (s) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r.dataset} | {r.workers} | {r.clips_per_s:.1f} | {r.startup_s:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
