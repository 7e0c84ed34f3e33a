"""Files the runs write for other processes and people to read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, payload: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """JSON through a temporary file in the same folder and ``os.replace``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False))
    os.replace(tmp, path)
