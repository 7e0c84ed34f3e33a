"""Files the runs write for other processes and people to read, and checkpoints read from elsewhere."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def write_json_atomic(path: Path, payload: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """JSON through a temporary file in the same folder and ``os.replace``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False))
    os.replace(tmp, path)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that holds more than tensors and plain containers, refused by :func:`load_checkpoint_safely`."""


def load_checkpoint_safely(
    path: str | os.PathLike[str],
    trust: bool = False,
    opt_in: str = "trust=True",
    allow: Iterable[Any] = (),
    map_location: Any = "cpu",
) -> Any:
    """``torch.load`` a checkpoint from outside this project without letting the file run code.

    By default the file is unpickled with ``weights_only=True``: tensors, numbers, strings and plain containers
    only (what a state dict, an optimizer state and Lightning's bookkeeping are made of), plus the globals in
    ``allow`` (passed to ``torch.serialization.safe_globals``; a class, a function, or ``(object, "module.Name")``).
    A pickle that names any other global (a class to build, a function to call: how a crafted file runs code) is
    refused with :class:`UnsafeCheckpointError` naming the file, the global, and ``opt_in``.

    Args:
        path: the checkpoint file.
        trust: load with ``weights_only=False`` (full pickle: the file can run arbitrary code), with a warning.
            Only for files from a source you trust.
        opt_in: how the user sets ``trust`` (e.g. ``--model.init_args.backbone.audio.trust_checkpoint true``);
            quoted in the refusal.
        allow: extra globals the file may name.
        map_location: as ``torch.load``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs globals outside the allow-list (and ``trust`` is false).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if trust:
        warnings.warn(f"{path}: loading with full pickle (trusted by {opt_in}): the file can run arbitrary code. "
                      "Do this only for files from a source you trust.", stacklevel=2)
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(Unsupported (?:global|operand|class)[^\n.]*)", str(err))
        detail = found.group(1) if found else str(err).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file holds more than tensors and plain containers ({detail}); a "
            f"crafted checkpoint runs code this way. If the file comes from a source you trust, opt in with "
            f"{opt_in} (full pickle, with a warning)."
        ) from None
