"""Stopping on SIGTERM / SIGINT (and requeueing on SLURM's signal) only between training steps, agreed by all ranks.

Lightning 2.6.6's own handling (``trainer/connectors/signal_connector.py``) breaks under real launchers:

- its SIGTERM handler runs ``dist.broadcast`` *inside the signal handler*: a collective started wherever the
  process happens to be (inside the gradient all-reduce, or on one rank only) hangs or fails with "Connection
  reset by peer";
- only rank 0's flag is broadcast, so a signal that reached rank 1 alone is never acted on;
- Ctrl-C raises ``KeyboardInterrupt`` mid-step, so an exception checkpoint holds a loader that delivered one
  batch more than the optimizer stepped on (resuming from it drops that batch);
- with ``SLURMEnvironment(auto_requeue=True)`` the requeue checkpoint is written from inside the handler too.

:class:`Preemption` replaces those handlers (from the first sanity-check or training batch on) with ones that only
record the signal. At every step boundary (``on_train_batch_end``, after every other callback) each rank puts
what it received into a tensor that is all-reduced with ``MAX``; when any rank got a signal, all ranks act at
that same boundary:

- SIGTERM / SIGINT: write ``checkpoints/on_exception.ckpt`` there and stop with
  :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` at the next hook (the CLI exits with
  143, or 130 when only SIGINT was received). A second SIGINT aborts at once, without a checkpoint.
- SIGUSR1 (only under ``SLURMEnvironment(auto_requeue=True)``, its ``requeue_signal``): write
  ``hpc_ckpt_<n>.ckpt``, run ``scontrol requeue <job>`` on rank 0, and keep training (SLURM's SIGTERM follows).

A boundary right before a validation (the last batch of an epoch, a ``val_check_interval`` batch) is not
used: a checkpoint taken there is not resumed like the uninterrupted run (Lightning runs the validation again
or skips it, see :class:`~avmoe.callbacks.checkpointing.LatestCheckpoint`). The signal then waits for the
validation to finish, and the epoch-end state (``on_train_epoch_end``, the state ``last.ckpt`` has) is saved.

An exception that is not such a stop (a crash, the second Ctrl-C) writes no checkpoint: the state is not known
to be between steps, and under DDP the other ranks may be inside a collective. The run resumes from the
newest periodic checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from avmoe._private_api import cluster_environment

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as a shell reports a kill


class _Received:
    """What this process received since the handlers were installed (set from signal handlers: plain ints)."""

    def __init__(self) -> None:
        self.stop = 0  # highest stop signal number received (SIGTERM 15 wins over SIGINT 2), 0 none
        self.requeue = 0  # 1 once the requeue signal arrived

    def clear(self) -> None:
        self.stop = self.requeue = 0


_RECEIVED = _Received()
_AGREED_STOP = 0  # the signal all ranks agreed to stop on (read by the CLI for the exit code)


def stop_exit_code(default: int = 143) -> int:
    """Exit code of the last agreed stop: 143 for SIGTERM, 130 for SIGINT (``default`` when there was none)."""
    return EXIT_CODES.get(signal.Signals(_AGREED_STOP), default) if _AGREED_STOP else default


def _on_stop_signal(signum: int, frame: Optional[FrameType]) -> None:
    if signum == signal.SIGINT and _RECEIVED.stop:
        raise KeyboardInterrupt  # Ctrl-C again: the user wants out now (no checkpoint)
    _RECEIVED.stop = max(_RECEIVED.stop, int(signum))


def _on_requeue_signal(signum: int, frame: Optional[FrameType]) -> None:
    _RECEIVED.requeue = 1


def _slurm_requeue_signal(trainer: Trainer) -> Optional[int]:
    """The requeue signal when the run uses ``SLURMEnvironment(auto_requeue=True)``, else None."""
    env = cluster_environment(trainer)  # private fallback for single-device strategies: see avmoe._private_api
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return int(env.requeue_signal or signal.SIGUSR1)
    return None


def hpc_checkpoint_path(folder: Path) -> Path:
    """``<folder>/hpc_ckpt_<n>.ckpt`` with n one more than the highest present (Lightning's naming)."""
    numbers = [int(m.group(1)) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt",
                                                                                            p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_slurm_job() -> int:
    """``scontrol requeue <job>`` for this job (array jobs: ``<array job>_<task>``); returns its exit code."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return subprocess.call(["scontrol", "requeue", job])


class Preemption(Checkpoint):
    """Signal handling that stops (or requeues) only at a training-step boundary agreed by every rank.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass so that Lightning runs its hooks after every
    other callback (checkpoint callbacks go last): the state it saves includes theirs for the finished step.

    Args:
        dirpath: checkpoint folder (``<run folder>/checkpoints``); the stop checkpoint is ``<filename>.ckpt``.
        filename: file name without ``.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")
        self._previous: dict[int, Any] = {}
        self._pending_stop = 0  # agreed, waiting for a boundary that is not right before a validation
        self._pending_requeue = 0
        self._saved_stop = False  # the stop checkpoint is written: raise at the next hook

    # ---------------------------------------------------------------- handlers
    def _install(self, trainer: Trainer) -> None:
        """Replace Lightning's handlers (registered right before the run stage) with flag-only ones."""
        global _AGREED_STOP
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        _RECEIVED.clear()
        _AGREED_STOP = 0
        handlers = {signal.SIGTERM: _on_stop_signal, signal.SIGINT: _on_stop_signal}
        requeue = _slurm_requeue_signal(trainer)
        if requeue is not None:
            handlers[requeue] = _on_requeue_signal
        for signum, handler in handlers.items():
            self._previous[signum] = signal.signal(signum, handler)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()
        if stage == "fit" and not trainer.interrupted:  # a completed fit: an older stop checkpoint is stale
            trainer.strategy.remove_checkpoint(self.ckpt_path)

    # ---------------------------------------------------------------- agreement
    def _agree(self, trainer: Trainer) -> tuple[int, int]:
        """(stop signal, requeue) received by any rank: one all-reduce, the same boundary on every rank."""
        local = (max(_RECEIVED.stop, self._pending_stop), max(_RECEIVED.requeue, self._pending_requeue))
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        flags = torch.tensor(local, dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), int(flags[1])

    @staticmethod
    def _validation_follows(trainer: Trainer, batch_idx: int) -> bool:
        """Whether a validation may run right after this batch (then the boundary is not used)."""
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return True
        every = trainer.val_check_batch
        return isinstance(every, int) and every > 0 and (batch_idx + 1) % every == 0

    def _act(self, trainer: Trainer, stop: int, requeue: int) -> None:
        global _AGREED_STOP
        if requeue:
            self._requeue(trainer)
        if stop:
            _AGREED_STOP = stop
            trainer.save_checkpoint(self.ckpt_path)  # every rank (a collective under DDP); rank 0 writes
            rank_zero_info(f"Received {signal.Signals(stop).name}: saved {self.ckpt_path} at global step "
                           f"{trainer.global_step}; stopping (resume with --run.resume auto)")
            self._saved_stop = True
        self._pending_stop = self._pending_requeue = 0
        _RECEIVED.clear()

    def _requeue(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        path = hpc_checkpoint_path(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            code = requeue_slurm_job()
            rank_zero_info(f"Requeue signal: saved {path}; scontrol requeue exited with {code}")
            if code != 0:
                rank_zero_warn(f"scontrol requeue failed with exit code {code}: the job will not be requeued")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        batch_idx = int(args[2]) if len(args) > 2 else int(kwargs.get("batch_idx", 0))
        stop, requeue = self._agree(trainer)
        if (stop or requeue) and self._validation_follows(trainer, batch_idx):
            self._pending_stop, self._pending_requeue = stop, requeue  # act after the validation
            _RECEIVED.clear()
            return
        if stop or requeue:
            self._act(trainer, stop, requeue)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stop, requeue = self._agree(trainer)  # also a signal that arrived during the epoch-end validation
        if stop or requeue:
            self._act(trainer, stop, requeue)

    # ---------------------------------------------------------------- stopping
    def _raise_if_saved(self) -> None:
        if self._saved_stop:
            self._saved_stop = False
            raise SIGTERMException()

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._raise_if_saved()

    def on_train_epoch_start(self, *args: Any, **kwargs: Any) -> None:
        self._raise_if_saved()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._raise_if_saved()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
        if trainer.state.fn == "fit" and not (_AGREED_STOP and isinstance(exception, SIGTERMException)):
            rank_zero_warn(f"fit stopped on {type(exception).__name__}, not at a step boundary: no checkpoint is "
                           "written for it (--run.resume auto continues from the newest periodic checkpoint)")
