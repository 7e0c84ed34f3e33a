"""Progress reporting that suits where the run's output goes.

Lightning 2.6 picks the Rich bar whenever ``rich`` is installed; in a batch job (SLURM, CI, ``nohup``) that prints
nothing useful. :func:`default_progress_bar` returns the Rich bar on a terminal and :class:`LineProgressBar`
otherwise, which prints one plain line every ``every_n_steps`` optimizer steps and at each epoch end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class LineProgressBar(ProgressBar):
    """Plain, grep-able progress lines for non-interactive output."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0 = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, flush=True)

    def _metrics(self, pl_module: Any) -> str:
        items = self.get_metrics(self.trainer, pl_module)
        items.pop("v_num", None)
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # A run resumed inside an epoch does not call on_train_epoch_start for it: time from the start of fit.
        self._t0 = time.monotonic()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every_n_steps == 0:
            total = self.total_train_batches
            self._print(f"epoch {trainer.current_epoch} step {batch_idx + 1}/{total} {self._metrics(pl_module)}")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        took = time.monotonic() - self._t0
        skipped = getattr(trainer.datamodule, "num_skipped", 0) if trainer.datamodule is not None else 0
        note = f" skipped={skipped}" if skipped else ""  # undecodable clips so far (on_decode_error: skip)
        self._print(f"epoch {trainer.current_epoch} done in {took:.1f}s {self._metrics(pl_module)}{note}")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            self._print(f"validation {self._metrics(pl_module)}")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._print(f"test {self._metrics(pl_module)}")


def default_progress_bar() -> ProgressBar:
    """Rich on an interactive terminal, plain lines otherwise."""
    return RichProgressBar(leave=True) if sys.stdout.isatty() else LineProgressBar()
