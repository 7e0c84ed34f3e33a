"""Round-robin timing shared by the benchmarks: every runner warmed up, then stepped in turn, so that load from
other processes (and the machine's own drift) spreads over all of them."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def seconds(fn: Callable[[], None]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(
    runs: dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
    timer: Callable[[Callable[[], None]], T] = seconds,  # type: ignore[assignment]
) -> dict[str, list[T]]:
    """Call every runner ``warmup`` times, then all of them in turn ``rounds`` times: name -> one ``timer``
    result per round."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[T]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            out[name].append(timer(fn))
    return out


def medians(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each runner over ``rounds`` round-robin rounds after one warm-up."""
    return {k: statistics.median(v) for k, v in round_robin(runs, rounds).items()}


def kernel_parser(doc: str) -> argparse.ArgumentParser:
    """The options every kernel-level benchmark takes: frames per clip (the shapes) and rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10, help="frames (10 = one AVE clip): sets the shapes")
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds after one warm-up")
    return parser
