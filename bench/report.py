"""Writing a benchmark's section into ``bench/BENCHMARKS.md`` (shared by the bench scripts)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

BENCHMARKS = Path(__file__).resolve().parent / "BENCHMARKS.md"


def replace_section(heading: str, text: str, path: Path = BENCHMARKS, keep_from: Optional[str] = None) -> None:
    """Replace the ``heading`` section (from its ``## `` line to the next ``## `` line) with ``text``, or append it.

    ``keep_from``: a marker (e.g. ``"**Reading"``); the old section's text from that marker on is kept after the new
    tables, because a hand-written reading must be revised by whoever re-runs, not silently dropped.
    """
    doc = path.read_text() if path.is_file() else "# Benchmarks\n"
    found = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M).search(doc)
    text = text.rstrip("\n") + "\n"
    if found is None:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        old = found.group(0)
        kept = old[old.index(keep_from):].rstrip("\n") + "\n" if keep_from and keep_from in old else ""
        rest = doc[found.end():]
        doc = doc[:found.start()] + text + ("\n" + kept if kept else "") + ("\n" + rest if rest else "")
    path.write_text(doc)
