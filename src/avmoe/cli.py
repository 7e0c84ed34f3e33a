"""Command line: ``lightning`` / ``avmoe`` / ``python -m avmoe`` (fit, validate, test, predict).

Built on LightningCLI, with one addition users of stock LightningCLI keep asking for: every experiment lives in
a fixed **run folder** ``<run.root>/<run.name>`` (config.yaml, TensorBoard events, ``checkpoints/``,
``metrics/*.json``). Stock LightningCLI writes each run to a new ``version_N`` folder, so
``--ckpt_path last`` finds nothing and silently trains from scratch (Lightning-AI/pytorch-lightning#18524);
here ``--ckpt_path last`` (or ``--run.resume auto``) resumes in the same folder with the same logger.
SIGTERM (and SLURM's requeue signal) writes a checkpoint and the process exits with 143.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse import set_docstring_parse_options
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import avmoe.datamodules  # noqa: F401  (registers the DataModule subclasses for class_path shorthands)
import avmoe.tasks  # noqa: F401
from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.callbacks.progress import default_progress_bar
from avmoe.datamodules.base import AVDataModule
from avmoe.tasks.base import AVTask

SIGTERM_EXIT_CODE = 143
# Field docstrings of our config dataclasses become --help text (litgpt does the same).
set_docstring_parse_options(attribute_docstrings=True)


@dataclass
class RunConfig:
    """Where a run lives and how it starts."""

    name: str = "default"
    """Run folder name: config.yaml, TensorBoard events, checkpoints/ and metrics/ go to <root>/<name>."""
    root: str = "runs"
    resume: Literal["never", "auto", "must"] = "never"
    """fit only: auto resumes from <run>/checkpoints/last.ckpt when it exists and starts fresh otherwise;
    must fails when there is none. ``--ckpt_path`` given explicitly always wins."""
    init_from: Optional[str] = None
    """Checkpoint whose model weights initialise this run (fine-tuning); no optimizer/loop state is restored."""
    init_strict: bool = True
    """With init_from: fail on missing or unexpected keys (False: load what matches and report the rest)."""
    checkpoint_every_n_steps: Optional[int] = None
    """Also save last.ckpt every n optimizer steps (mid-epoch resume)."""
    test_after_fit: bool = False
    """After fit, test the best checkpoint (metrics/test.json), in the same process and run folder."""

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name


def _run_config(value: Any) -> RunConfig:
    if isinstance(value, RunConfig):
        return value
    return RunConfig(**{k: v for k, v in dict(value).items() if k in RunConfig.__dataclass_fields__})


class AVMoECLI(LightningCLI):
    """LightningCLI with the run folder, resume modes, weights-only init and the JSON metrics writer."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(RunConfig, "run")

    @property
    def run_config(self) -> RunConfig:
        return _run_config(self._get(self.config_init, "run"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        run = self.run_config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=run.root, name=run.name, version="", default_hp_metric=False)
        kwargs.setdefault("default_root_dir", str(run.folder))
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        existing = list(config.get("callbacks") or []) + list(callbacks)
        callbacks = callbacks + self._run_callbacks(existing, config)
        return super()._instantiate_trainer(config, callbacks)

    def _run_callbacks(self, existing: list[Callback], config: dict[str, Any]) -> list[Callback]:
        run, model = self.run_config, self.model
        ckpt_dir = run.folder / "checkpoints"
        extra: list[Callback] = [MetricsJSON(str(run.folder / "metrics"))]
        if not any(isinstance(c, ModelCheckpoint) for c in existing):
            monitor = getattr(model, "monitor", None)
            extra.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=monitor,
                                         mode=getattr(model, "monitor_mode", "min"), save_last=True,
                                         enable_version_counter=False))
            if run.checkpoint_every_n_steps:
                extra.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:07d}", save_last=True,
                                             every_n_train_steps=run.checkpoint_every_n_steps, save_top_k=1,
                                             monitor="step", mode="max", auto_insert_metric_name=False))
        if not any(isinstance(c, OnExceptionCheckpoint) for c in existing):
            extra.append(OnExceptionCheckpoint(dirpath=str(ckpt_dir), filename="on_exception"))
        wants_bar = config.get("enable_progress_bar") in (None, True)
        if wants_bar and not any(isinstance(c, ProgressBar) for c in existing):
            extra.append(default_progress_bar())
        return extra

    def after_instantiate_classes(self) -> None:
        run = self.run_config
        if run.init_from:
            init_weights(self.model, run.init_from, strict=run.init_strict)

    def before_fit(self) -> None:
        run, fit_cfg = self.run_config, self.config_init["fit"]
        if fit_cfg.get("ckpt_path") or run.resume == "never":
            return
        last = run.folder / "checkpoints" / "last.ckpt"
        if last.is_file():
            rank_zero_info(f"Resuming {run.name} from {last}")
            fit_cfg["ckpt_path"] = str(last)
        elif run.resume == "must":
            raise FileNotFoundError(f"run.resume=must but {last} does not exist")
        else:
            rank_zero_info(f"No checkpoint in {last.parent}: starting {run.name} from scratch")

    def after_fit(self) -> None:
        if self.run_config.test_after_fit and not self.trainer.interrupted:
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def init_weights(model: LightningModule, ckpt_path: str, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load only the model weights of a checkpoint; report (and with ``strict`` refuse) key mismatches."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"run.init_from: checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    omitted = tuple(ckpt.get("omitted_frozen_prefixes", ()))  # frozen pretrained encoders: rebuilt, not stored
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not (omitted and k.startswith(omitted)))
    unexpected = sorted(k for k in state if k not in own)
    shape = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if strict and (missing or unexpected or shape):
        raise RuntimeError(f"init_from {path}: missing keys {missing[:20]}, unexpected keys {unexpected[:20]}, "
                           f"shape mismatches {shape[:20]} (set run.init_strict=false to load what matches)")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in shape}, strict=False)
    rank_zero_info(f"init_from {path}: loaded {len(state) - len(unexpected) - len(shape)} tensors; "
                   f"missing {len(missing)}, unexpected {len(unexpected)}, shape mismatch {len(shape)}")
    return missing, unexpected


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning`` and ``avmoe`` console scripts."""
    try:
        AVMoECLI(
            AVTask,
            AVDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": True},
            args=args,
        )
    except SIGTERMException:
        # Lightning 2.6.6 turns SIGTERM into a clean exit (code 0); requeue wrappers need to see the kill.
        sys.exit(SIGTERM_EXIT_CODE)


if __name__ == "__main__":
    cli_main()
