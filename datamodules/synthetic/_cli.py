"""Arguments shared by the synthetic-release subcommands (size of the release, media settings, --force)."""

from __future__ import annotations

import argparse


def add_release_args(p: argparse.ArgumentParser, *, root_help: str = "output folder", num_train: int = 48,
                     num_val: int = 12, num_test: int = 24, fps: int = 8, wav_help: str) -> None:
    """--root, split sizes, --num-categories, --seed, --size, --fps, --sample-rate, --with-wav, --force."""
    p.add_argument("--root", required=True, help=root_help)
    p.add_argument("--num-train", type=int, default=num_train)
    p.add_argument("--num-val", type=int, default=num_val)
    p.add_argument("--num-test", type=int, default=num_test)
    p.add_argument("--num-categories", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--fps", type=int, default=fps)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--with-wav", action="store_true", help=wav_help)
    p.add_argument("--force", action="store_true", help="write even if the release already exists")
