"""Validation and test metrics as JSON in the run folder, never overwriting the fit's record.

File names (``<run folder>/metrics/``):

- ``val.json``: the latest validation of ``fit`` (the model being trained: its epoch and step);
- ``test.json``: ``run.test_after_fit``, the best checkpoint tested right after fit;
- ``<subcommand>_<split>.json``: a standalone ``validate`` / ``test`` (``validate_val.json``, ``test_test.json``).

Each holds the evaluated checkpoint's path with the epoch and step stored in it (``checkpoint: null`` for the
in-training validation), the subcommand and the metrics.

Other callbacks may name files they wrote beside it (:meth:`MetricsJSON.attach_file`; CRMT's per-sample certified
bounds): ``files`` maps a name to the file's name in the same folder.

With a DataModule that skips undecodable clips (``AVDataModule(on_decode_error="skip")``) the files also hold
``num_skipped`` (skipped samples so far, every rank) and ``skipped_clips`` (path -> reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn

from avmoe.files import write_json_atomic


def checkpoint_position(path: str) -> dict[str, Any]:
    """``epoch`` (0-based, as Lightning stores it) and ``global_step`` of a checkpoint file (memory-mapped read)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}


class MetricsJSON(Callback):
    """After each validation / test run, dump ``trainer.callback_metrics`` of that split (rank 0 only).

    It also gathers the DataModule's skipped clips from every rank (``sync_skipped``, a collective under DDP) at
    each train epoch end and before each write, so rank 0 names them all.

    Args:
        dirpath: folder for the JSON files (the CLI sets ``<run folder>/metrics``).
        subcommand: the CLI subcommand this process runs; anything but ``fit`` prefixes the file names with it.
    """

    def __init__(self, dirpath: str, subcommand: str = "fit") -> None:
        self.dirpath = Path(dirpath)
        self.subcommand = subcommand
        self._files: dict[str, dict[str, str]] = {}

    def attach_file(self, split: str, name: str, filename: str) -> None:
        """Name ``filename`` (in the metrics folder) under ``files.<name>`` of the split's next JSON."""
        self._files.setdefault(split, {})[name] = filename

    def path(self, split: str) -> Path:
        prefix = "" if self.subcommand == "fit" else f"{self.subcommand}_"
        return self.dirpath / f"{prefix}{split}.json"

    @staticmethod
    def _sync_skipped(trainer: Any) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "sync_skipped"):
            datamodule.sync_skipped()  # every rank, before the rank-0 return below
        return datamodule

    def _write(self, trainer: Any, split: str) -> None:
        datamodule = self._sync_skipped(trainer)
        files = self._files.pop(split, None)  # every rank: none is left over for a later run
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
        if not metrics:
            return
        in_training = trainer.state.fn == TrainerFn.FITTING
        ckpt: Optional[str] = None if in_training else trainer.ckpt_path
        if ckpt is not None and Path(ckpt).is_file():
            position = checkpoint_position(ckpt)
            ckpt = str(Path(ckpt).resolve())
        else:  # the model in memory: in-training validation, or an evaluation without --ckpt_path
            position = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        payload = {"subcommand": self.subcommand, "split": split, "checkpoint": ckpt, **position, "metrics": metrics}
        extra = getattr(trainer.lightning_module, "metrics_details", None)
        if callable(extra):  # per-class results etc. of the split metric (AVTask.metrics_details)
            details = extra(split)
            if details:
                payload["details"] = details
        if files:
            payload["files"] = files
        if getattr(datamodule, "on_decode_error", None) == "skip":
            payload.update(num_skipped=datamodule.num_skipped, skipped_clips=dict(datamodule.skipped_clips))
        write_json_atomic(self.path(split), payload, sort_keys=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._sync_skipped(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, "test")
