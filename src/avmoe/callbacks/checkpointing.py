"""Run-folder checkpoints: the latest state (epoch ends, inside epochs) and finding the newest loadable one.

The stop checkpoint (``on_exception.ckpt``) is written by :class:`avmoe.callbacks.preemption.Preemption`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

# Tie-break for equal modification times: the later writer wins (exception > requeue > periodic).
_PRIORITY = {"last": 0, "hpc": 1, "on_exception": 2}


class LatestCheckpoint(ModelCheckpoint):
    """Overwrite ``<dirpath>/last.ckpt`` at every epoch end, or every ``every_n_train_steps`` steps inside epochs.

    Why not ``ModelCheckpoint(monitor=..., save_last=True)``: since Lightning 2.6 that writes ``last.ckpt`` only
    when the monitored value improved (``on_train_epoch_end``: "Only save last checkpoint if a checkpoint was
    actually saved in this step"), so ``last.ckpt`` silently lags behind and a resume repeats epochs. This
    callback has no monitor and always writes. The CLI uses one per trigger (epoch end; every n steps), both
    writing the same ``last.ckpt``.

    With ``every_n_train_steps`` it skips the last batch of an epoch: Lightning 2.6.6 does not resume a
    checkpoint taken there (``on_train_batch_end`` of the last batch) like the uninterrupted run: it runs that
    epoch's validation again and skips ``on_train_epoch_start`` of the next epoch (measured: same weights, loop
    counters off, epoch-start callbacks not called). The epoch-end save right after covers that point. The train
    loader's position is in the checkpoint (``ResumableDataLoader``), so resuming continues with the next batch.

    Args:
        dirpath: checkpoint folder (``<run folder>/checkpoints``).
        every_n_train_steps: None saves at every epoch end; n saves every n optimizer steps inside epochs.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


def run_checkpoints(folder: Path) -> dict[Path, str]:
    """Resumable checkpoints of a run folder and their kind (``last``, ``on_exception``, ``hpc``)."""
    ckpt_dir = folder / "checkpoints"
    found = {p: "last" for p in ckpt_dir.glob("last*.ckpt")}
    found.update({p: "on_exception" for p in ckpt_dir.glob("on_exception*.ckpt")})
    found.update({p: "hpc" for p in folder.glob("hpc_ckpt_*.ckpt")})  # SLURM requeue (SLURMEnvironment)
    return {p: kind for p, kind in found.items() if p.is_file()}


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be loaded as a checkpoint (truncated, not a zip archive, a CRC error), or None.

    ``torch.save`` writes a zip archive: a file cut short (a kill while writing, a full disk) has no central
    directory, and a damaged one fails the CRC check of :meth:`zipfile.ZipFile.testzip`, which reads the file once.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return f"CRC error in {bad}" if bad is not None else None


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest loadable resumable checkpoint of a run folder, or None.

    Candidates: ``checkpoints/last*.ckpt`` (epoch end, every n steps), ``checkpoints/on_exception.ckpt``
    (SIGTERM, Ctrl-C) and ``hpc_ckpt_*.ckpt`` (SLURM requeue). Newest by modification time, as Lightning's
    ``ckpt_path="last"`` does. A newer one that cannot be loaded (:func:`checkpoint_problem`) is passed over with
    a warning naming it and the one used instead.
    """
    found = run_checkpoints(folder)
    ordered = sorted(found, key=lambda p: (p.stat().st_mtime_ns, _PRIORITY[found[p]]), reverse=True)
    unusable = []
    for path in ordered:
        problem = checkpoint_problem(path)
        if problem is None:
            if unusable:
                rank_zero_warn(f"{'; '.join(unusable)}: not loadable, passed over; using {path}")
            return path
        unusable.append(f"{path} ({problem})")
    if unusable:
        rank_zero_warn(f"{'; '.join(unusable)}: not loadable; no usable checkpoint in {folder}")
    return None
