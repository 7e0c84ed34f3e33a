"""The error every annotation reader raises, and the text decoding they share.

Every malformed annotation file (AVE lists, LLP CSVs, AVSBench meta-data CSVs, MUSIC-AVQA JSON) is reported as an
:class:`AnnotationError` naming the file and, where one applies, the 1-based line (or JSON row): never a bare
``UnicodeDecodeError`` or parser error from deep inside a library, never silently read as fewer rows. A file or
split that yields no sample is an error too (an empty split would fit 0 batches and "succeed").

Tolerated on purpose (not errors): a UTF-8 byte-order mark, CRLF or CR line ends, blank lines and spaces around
fields. Release quirks that the official code accepts are warned about where they are read (LLP eval rows,
repeated MUSIC-AVQA question IDs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

ENCODING = "utf-8-sig"  # UTF-8, tolerating a byte-order mark (Windows editors write one)


class AnnotationError(ValueError):
    """A malformed annotation file.

    A ``ValueError`` subclass, so callers that caught ``ValueError`` before keep working.

    Args:
        path: the file.
        reason: what is wrong.
        line: 1-based line of the problem (``None`` when the whole file is at fault).
        unit: what ``line`` counts (``line``; ``row`` for the 0-based objects of a JSON array).
        note: said in brackets after the place (e.g. ``question_id 28``).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, line: Optional[int] = None,
                 unit: str = "line", note: Optional[str] = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        self.unit = unit
        self.note = note
        where = self.path if line is None else f"{self.path}, {unit} {line}"
        where += f" ({note})" if note else ""
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers / processes
        return type(self), (self.path, self.reason, self.line, self.unit, self.note)


def read_annotation_text(path: str | os.PathLike[str]) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped); other bytes are an :class:`AnnotationError`.

    The caller checks that the file exists (each reader names its own release in that message).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        bad = data[err.start : err.end].hex(" ")
        raise AnnotationError(path, f"not UTF-8 text (byte(s) {bad} at offset {err.start}); "
                              "save the file as UTF-8", line) from None


def require_rows(count: int, path: str | os.PathLike[str], what: str) -> None:
    """An annotation file (or split) that yields no sample is an error, not an empty epoch."""
    if count == 0:
        raise AnnotationError(path, f"no {what} (an empty split would train or evaluate on nothing)")
