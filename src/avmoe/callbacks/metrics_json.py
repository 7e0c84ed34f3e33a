"""Write validation and test metrics as JSON into the run folder (``metrics/val.json``, ``metrics/test.json``).

With a DataModule that skips undecodable clips (``AVDataModule(on_decode_error="skip")``) the files also hold
``num_skipped`` (skipped samples so far, every rank) and ``skipped_clips`` (path -> reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from avmoe.files import write_json_atomic


class MetricsJSON(Callback):
    """After each validation / test run, dump ``trainer.callback_metrics`` of that split (rank 0 only).

    It also gathers the DataModule's skipped clips from every rank (``sync_skipped``, a collective under DDP) at
    each train epoch end and before each write, so rank 0 names them all.

    Args:
        dirpath: folder for the JSON files (the CLI sets ``<run folder>/metrics``).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    @staticmethod
    def _sync_skipped(trainer: Any) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "sync_skipped"):
            datamodule.sync_skipped()  # every rank, before the rank-0 return below
        return datamodule

    def _write(self, trainer: Any, split: str) -> None:
        datamodule = self._sync_skipped(trainer)
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
        if not metrics:
            return
        payload = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics}
        if getattr(datamodule, "on_decode_error", None) == "skip":
            payload.update(num_skipped=datamodule.num_skipped, skipped_clips=dict(datamodule.skipped_clips))
        write_json_atomic(self.dirpath / f"{split}.json", payload, sort_keys=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._sync_skipped(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, "test")
