"""Write validation and test metrics as JSON into the run folder (``metrics/val.json``, ``metrics/test.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from avmoe.files import write_json_atomic


class MetricsJSON(Callback):
    """After each validation / test run, dump ``trainer.callback_metrics`` of that split (rank 0 only).

    Args:
        dirpath: folder for the JSON files (the CLI sets ``<run folder>/metrics``).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def _write(self, trainer: Any, split: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
        if not metrics:
            return
        payload = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics}
        write_json_atomic(self.dirpath / f"{split}.json", payload, sort_keys=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, "test")
