"""Errors users cause (a missing root, weights folder or checkpoint, a bad option): one clear line, no traceback.

The command line prints ``error: <message>`` and exits with code 1 for them; ``AVMOE_DEBUG=1`` re-raises with the
full traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import re
from typing import Optional

DEBUG_ENV = "AVMOE_DEBUG"
# What a user fixes in the config or on disk, not in the code.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)
# jsonargparse reports an exception raised while instantiating a class of a ``Optional[Base]`` argument (our model
# and data) as a ValueError listing, per union member, a message; the original exception is not chained.
_UNION_ERROR = "Does not validate against any of the Union subtypes"
_NONE_MEMBER = re.compile(r"^Expected a <class 'NoneType'>")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _union_messages(text: str) -> list[str]:
    """The per-member messages of jsonargparse's union error, without the ``None`` member's."""
    if _UNION_ERROR not in text or "Errors:" not in text:
        return []
    body = text.split("Errors:", 1)[1].split("\nGiven value type:", 1)[0]
    items = [m.strip() for m in re.split(r"\n\s*- ", "\n" + body.strip()) if m.strip()]
    return [m for m in items if not _NONE_MEMBER.match(m)]


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message for an error the user caused, or None when ``exc`` looks like a bug."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: PLC0415

    from avmoe.datamodules.annotations import AnnotationError  # noqa: PLC0415
    from avmoe.datamodules.decoding import DecodeError  # noqa: PLC0415

    for err in _chain(exc):
        if isinstance(err, USER_ERRORS + (MisconfigurationException,)):
            return str(err)
        if isinstance(err, (AnnotationError, DecodeError)):  # bad input files: the message names the file
            return _last_line(str(err))
        if isinstance(err, ValueError):
            messages = _union_messages(str(err))
            if messages:
                return "; ".join(messages)
    return None


def _last_line(text: str) -> str:
    """A DataLoader worker re-raises a file error as "Caught X in DataLoader worker ... Original Traceback ...
    module.X: message": keep the original message."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+Error: ", "", last)
