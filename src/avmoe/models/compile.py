"""Regional ``torch.compile``: one function per block type, compiled on first use, eager where unsupported.

Blocks of one type share a function (weights are graph inputs), so a shape is compiled once and reused across
blocks. Where compilation is unsupported (no compiler toolchain, an unsupported platform or Python, a backend
error) the call runs eagerly and warns once; a failure that eager execution reproduces is a real error and is
raised as such.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable


class RegionalCompile:
    """``fn`` behind an on/off switch for ``torch.compile``; ``compile_seconds`` sums the calls that compiled."""

    def __init__(self, fn: Callable[..., Any], enabled: bool, name: str, **options: Any) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.options = options
        self.compile_seconds = 0.0
        self._compiled: Callable[..., Any] | None = None
        self._shapes: set[tuple] = set()

    def _disable(self, reason: BaseException) -> None:
        self.enabled = False
        self._compiled = None
        warnings.warn(f"torch.compile of {self.name} is unsupported here ({type(reason).__name__}: {reason}); "
                      "running it eagerly.", RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any) -> Any:
        if not self.enabled:
            return self.fn(*args)
        if self._compiled is None:
            try:
                import torch

                self._compiled = torch.compile(self.fn, **self.options)
            except Exception as exc:  # noqa: BLE001 -- any failure to set up compilation means "unsupported"
                self._disable(exc)
                return self.fn(*args)
        # Shapes and constant flags (guards of the compiled graph); modules are graph inputs, not keys.
        key = tuple(tuple(a.shape) + (a.dtype,) if hasattr(a, "shape") else a
                    for a in args if hasattr(a, "shape") or isinstance(a, (bool, type(None))))
        start = time.perf_counter()
        try:
            out = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 -- re-run eagerly: a real error raises again there
            out = self.fn(*args)
            self._disable(exc)
            return out
        if key not in self._shapes:  # first call at this shape: compilation happened inside
            self._shapes.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out
