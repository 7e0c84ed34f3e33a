"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

import gc
import importlib
import os
import signal as signal_module
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"


def calm_gc() -> None:
    """Cheaper garbage collection for a test process that runs many fits: what is loaded so far (modules,
    fixtures, memoised clips) moves out of the collector's view, and young objects are collected 30x less often.
    Measured on the one-process balance matrix of one task (9 fits): collector time 1.1 -> 0.3 s of ~16 s."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, restored after: tiny models gain nothing from a second one, on a shared 2-core box two
    spin against each other, and DDP ranks (OMP_NUM_THREADS=1) then add up reductions in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_fit_args(data_root: Path, run_root: Path, name: str = "t", epochs: int = 1, **overrides: object) -> list[str]:
    """CLI arguments for a seconds-long AVE run on the demo config (tiny model, generated data)."""
    args = [
        "--config", str(CONFIGS / "demo.yaml"),
        f"--data.init_args.root={data_root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        f"--run.root={run_root}",
        f"--run.name={name}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--run.test_after_fit=false",
    ]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return args


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m avmoe ARGS`` as a user runs it (the console-script path, errors shortened), in the background."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("AVMOE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "avmoe", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_cli(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_cli` process; its exit code and output."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------ every task
# One entry per task whose demo config exists: (config file, release fixture in conftest.py, extra overrides).
# Tests parametrized over TASK_CASES cover every task that exists (absent or unloadable configs are skipped).
TASK_CASES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ave": ("demo.yaml", "ave_release", ()),
    "avvp": ("demo_avvp.yaml", "llp_release", ()),
    "avs": ("demo_avs.yaml", "avs_release", ("--data.init_args.eval_batch_size=2",)),
    # 4 of the 10 segments: an AVQA sample decodes 60-s videos plus negative frames, and its step runs the plain
    # Swin on the negatives (measured: 389 vs 281 ms per 2-clip training step of the AVE demo model, CPU).
    "avqa": ("demo_avqa.yaml", "avqa_release", ("--data.init_args.num_segments=4",)),
}


def task_fit_args(task: str, data_root: Path, run_root: Path, name: str = "t", epochs: int = 1,
                  batch_size: int = 2, **overrides: object) -> list[str]:
    """CLI arguments for a seconds-long run of ``task``'s demo config (tiny model, generated data, no workers)."""
    config, _, extra = TASK_CASES[task]
    args = [
        "--config", str(CONFIGS / config),
        f"--data.init_args.root={data_root}",
        "--data.init_args.num_workers=0",
        f"--data.init_args.batch_size={batch_size}",
        f"--run.root={run_root}",
        f"--run.name={name}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--run.test_after_fit=false",
        *extra,
    ]
    if task == "avqa":  # the decoded-clip cache lives beside the generated release (shared by the tests)
        args.append(f"--data.init_args.cache_dir={data_root / 'cache'}")
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return args


def task_config_problem(task: str) -> str | None:
    """Why ``task``'s demo config cannot be used here (missing file, unknown class), or None."""
    config = CONFIGS / TASK_CASES[task][0]
    if not config.is_file():
        return f"{config.name} does not exist (task {task} not written yet)"
    import yaml  # noqa: PLC0415

    cfg = yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        class_path = (cfg.get(section) or {}).get("class_path", "")
        module, _, name = class_path.rpartition(".")
        try:
            if not hasattr(importlib.import_module(module), name):
                return f"{config.name}: {class_path} not found"
        except ImportError as err:
            return f"{config.name}: cannot import {class_path} ({err})"
    return None


class SignalAtStep(Callback):
    """Sends ``signal`` at a reproducible point of training, as a scheduler or a user would from outside.

    The handlers only record the signal and act at the next step boundary, so the point where it arrives is
    what a test chooses, not where the run stops.

    Args:
        step: global step at which to signal.
        signal: signal name (``SIGTERM``, ``SIGINT``, ``SIGUSR1``).
        when: ``batch_end``: after the training batch that completes global step ``step``; ``batch_start``: inside
            the step that will complete global step ``step`` (before its forward); ``validation``: after the first
            batch of the validation that runs at global step ``step``.
        to: ``self`` (this process) or ``group`` (this process group: DataLoader workers and DDP ranks started by
            Lightning too, as SLURM, torchrun and Ctrl-C signal).
        rank: only this global rank sends; None: every rank sends (each to itself).
    """

    def __init__(self, step: int, signal: str = "SIGTERM", when: str = "batch_end", to: str = "self",
                 rank: int | None = None) -> None:
        if when not in ("batch_end", "batch_start", "validation") or to not in ("self", "group"):
            raise ValueError(f"unknown when={when!r} or to={to!r}")
        self.step, self.signal, self.when, self.to, self.rank = step, signal, when, to, rank
        self._sent = False

    def _send(self, trainer: Any) -> None:
        if self._sent or (self.rank is not None and trainer.global_rank != self.rank):
            return
        self._sent = True
        signum = getattr(signal_module, self.signal)
        if self.to == "group":
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.when == "batch_end" and trainer.global_step == self.step:
            self._send(trainer)

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if self.when == "batch_start" and trainer.global_step + 1 == self.step:
            self._send(trainer)

    def on_validation_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.when == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send(trainer)


class RaiseAtStep(Callback):
    """Raises ``RuntimeError("injected ...")`` at the start of the training batch that would complete ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step + 1 == self.step:
            raise RuntimeError(f"injected failure before step {self.step}")


def ave_batch(task: Any, b: int = 2, events: tuple[int, int] = (2, 8), audio_scale: float = 1.0,
              audio_shift: float = 0.0) -> dict:
    """A seeded in-memory AVE batch for ``task``'s backbone: uint8 frames, log-mel-like audio (``randn * scale +
    shift``), segments ``events[0]:events[1]`` labelled with class ``i % 3`` of clip i, the rest background (28)."""
    cfg = task.backbone_config
    g = torch.Generator().manual_seed(0)
    label = torch.full((b, 10), 28)
    label[:, events[0]:events[1]] = torch.arange(b)[:, None] % 3
    return {"video": torch.randint(0, 255, (b, 10, 3, cfg.visual.image_size, cfg.visual.image_size),
                                   dtype=torch.uint8, generator=g),
            "audio": torch.randn(b, 10, 101, cfg.audio.num_mel_bins, generator=g) * audio_scale + audio_shift,
            "audio_mask": torch.ones(b), "visual_mask": torch.ones(b), "index": torch.arange(b), "label": label}
