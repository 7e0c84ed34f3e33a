"""Time AVE inference of AVMoE (backbone + CMBS head, eval mode, no grad), plain vs each optimisation.

Same protocol as ``bench/train_step.py`` (one process, one model, rows stepped round robin, median reported):
``plain`` (library attention blocks), ``+fast attention`` (``backbone.fast`` without its batched experts),
``+batched experts``, ``+factored token map``, ``+oneDNN GEMM`` (the rest of ``backbone.fast``: the frozen
encoders' GEMMs through oneDNN on a CPU), ``+compile`` (regional
``torch.compile``; default on CUDA, ``--compile`` on a CPU), per precision, and ``official`` (the official
AVMoE AVE forward in eval mode under no_grad, from ``--official ROOT``; one row per precision).

    python bench/inference.py                                     # on a GPU
    python bench/inference.py --device cpu --clips 1 --official /path/to/AVMOE-checkout
    python bench/inference.py --tiny --device cpu                 # smoke run (tests use this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_step import (  # noqa: E402
    Result, Row, apply_row, autocast, device_for, make_task, parser_for, run_benchmark,
)


def rows_for(args: argparse.Namespace, device: torch.device) -> list[Row]:
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    rows = []
    for precision in args.precision:
        tag = "" if precision == "32-true" else f" {precision}"
        rows += [Row("plain" + tag, precision=precision), Row("+fast attention" + tag, fast=True, precision=precision),
                 Row("+batched experts" + tag, fast=True, batched=True, precision=precision),
                 Row("+factored token map" + tag, fast=True, batched=True, factored=True, precision=precision),
                 Row("+oneDNN GEMM" + tag, fast=True, batched=True, factored=True, onednn=True, precision=precision)]
        if compile_on:
            rows.append(Row("+compile" + tag, fast=True, batched=True, factored=True, onednn=True, compile=True,
                            precision=precision))
    return rows


def main(argv: list[str] | None = None) -> list[Result]:
    args = parser_for(__doc__, [8]).parse_args(argv)
    device = device_for(args)
    task = make_task(args.tiny, device).eval()

    def runner_for(row: Row, batch: dict) -> Callable[[], None]:
        def run() -> None:
            apply_row(task, row)
            with torch.no_grad(), autocast(device, row.precision):
                task(batch)
        return run

    return run_benchmark(args, task, device, rows_for(args, device), runner_for, train=False)


if __name__ == "__main__":
    main()
