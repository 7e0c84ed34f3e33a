"""``python -m avmoe.datamodules.synthetic DATASET --root DIR [...]``: write a synthetic release if absent.

Each dataset module provides an ``add_*_parser(sub)`` function that adds its subcommand(s) and a
``run_*(args)`` function; they are listed in :data:`COMMANDS`. A module that fails to import only
loses its own subcommands (reported on stderr), so one broken generator never blocks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

# module (relative to this package), parser hook, runner, subcommands it adds
COMMANDS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("ave", "add_ave_parser", "run_ave", ("ave",)),
    ("imbalanced", "add_imbalanced_parser", "run_imbalanced", ("ave_imbalanced",)),
    ("llp", "add_llp_parser", "run_llp", ("llp",)),
    ("avsbench", "add_avs_parsers", "run_avs", ("avs_s4", "avs_ms3")),
    ("musicavqa", "add_musicavqa_parser", "run_musicavqa", ("musicavqa",)),
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[Any], int]]]:
    parser = argparse.ArgumentParser(
        prog="python -m avmoe.datamodules.synthetic",
        description="Write a synthetic release in the official on-disk layout (skipped if present unless --force).",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    runners: dict[str, Callable[[Any], int]] = {}
    for module_name, add_name, run_name, commands in COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
            add, run = getattr(module, add_name), getattr(module, run_name)
        except (ImportError, AttributeError) as err:
            print(f"warning: synthetic {module_name!r} generator unavailable ({err})", file=sys.stderr)
            continue
        add(sub)
        runners.update(dict.fromkeys(commands, run))
    return parser, runners


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, runners = _parser()
    args = parser.parse_args(argv)
    return int(runners[args.dataset](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
