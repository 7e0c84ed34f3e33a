"""Command line: ``lightning`` / ``avmoe`` / ``python -m avmoe`` (fit, validate, test, predict).

Built on LightningCLI, with one addition users of stock LightningCLI keep asking for: every experiment lives in
a fixed **run folder** ``<run.root>/<run.name>`` (config.yaml, TensorBoard events, ``checkpoints/``,
``metrics/*.json``). Stock LightningCLI writes each run to a new ``version_N`` folder, so
``--ckpt_path last`` finds nothing and silently trains from scratch (Lightning-AI/pytorch-lightning#18524);
here ``--ckpt_path last`` (or ``--run.resume auto``) resumes in the same folder with the same logger, from the
newest of ``last.ckpt``, ``on_exception.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``, and fails when there is none
(stock Lightning warns and trains from scratch).

Exact resume: the train loader is checkpointed mid-epoch and its order is a function of (seed, epoch)
(``avmoe.datamodules.sampling``), and :class:`~avmoe.callbacks.seeding.StepSeeding` reseeds the global RNGs
before every training batch, so fit N epochs == fit k, resume, fit to N, bit for bit on CPU.
SIGTERM (and SLURM's requeue signal) writes a checkpoint and the process exits with 143.
"""

from __future__ import annotations

import importlib
import inspect
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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import avmoe.datamodules  # noqa: F401  (registers the DataModule subclasses for class_path shorthands)
import avmoe.tasks  # noqa: F401
from avmoe.callbacks.checkpointing import ExceptionCheckpoint, LatestCheckpoint, latest_checkpoint
from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.callbacks.progress import default_progress_bar
from avmoe.callbacks.seeding import StepSeeding
from lightning.pytorch import LightningDataModule
from avmoe.tasks.base import AVTask

SIGTERM_EXIT_CODE = 143
HELP_FLAGS = ("-h", "--help", "--print_config=comments")


@dataclass
class RunConfig:
    """Where a run lives and how it starts."""

    name: str = "default"
    """Run folder name: config.yaml, TensorBoard events, checkpoints/ and metrics/ go to <root>/<name>."""
    root: str = "runs"
    resume: Literal["never", "auto", "must"] = "never"
    """fit only: auto resumes from the run's newest checkpoint (checkpoints/last.ckpt, checkpoints/on_exception.ckpt,
    hpc_ckpt_*.ckpt) when there is one and starts fresh otherwise; must fails when there is none.
    ``--ckpt_path`` given explicitly always wins."""
    init_from: Optional[str] = None
    """Checkpoint whose model weights initialise this run (fine-tuning); no optimizer/loop state is restored."""
    init_strict: bool = True
    """With init_from: fail on missing or unexpected keys (False: load what matches and report the rest)."""
    checkpoint_every_n_steps: Optional[int] = None
    """Also save checkpoints/last.ckpt every n optimizer steps inside epochs (mid-epoch resume at the next batch)."""
    step_seeding: bool = True
    """Reseed torch/numpy/random from (seed, epoch, batch, rank) before every training batch, so a resumed run
    draws the random numbers of the uninterrupted one (needs seed_everything)."""
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
        trainer = super()._instantiate_trainer(config, callbacks)
        if self.run_config.step_seeding and not any(isinstance(c, StepSeeding) for c in trainer.callbacks):
            trainer.callbacks.insert(0, StepSeeding())  # first: before any other on_train_batch_start
        return trainer

    def _run_callbacks(self, existing: list[Callback], config: dict[str, Any]) -> list[Callback]:
        run, model = self.run_config, self.model
        ckpt_dir = run.folder / "checkpoints"
        extra: list[Callback] = [MetricsJSON(str(run.folder / "metrics"))]
        if not any(isinstance(c, ModelCheckpoint) for c in existing):
            monitor = getattr(model, "monitor", None)
            # best.ckpt first: trainer.checkpoint_callback (test_after_fit, --ckpt_path best) is the first one.
            extra.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=monitor,
                                         mode=getattr(model, "monitor_mode", "min"), enable_version_counter=False))
            extra.append(LatestCheckpoint(dirpath=str(ckpt_dir)))
            if run.checkpoint_every_n_steps:
                extra.append(LatestCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=run.checkpoint_every_n_steps))
        if not any(isinstance(c, (OnExceptionCheckpoint, ExceptionCheckpoint)) for c in existing):
            extra.append(ExceptionCheckpoint(dirpath=str(ckpt_dir)))
        wants_bar = config.get("enable_progress_bar") in (None, True)
        if wants_bar and not any(isinstance(c, ProgressBar) for c in existing):
            extra.append(default_progress_bar())
        return extra

    def _parse_ckpt_path(self) -> None:
        """Merge a checkpoint's hyper-parameters into the model config (so ``test --ckpt_path x.ckpt`` rebuilds
        the trained architecture), as stock LightningCLI does, but for our tasks.

        Stock LightningCLI validates them against the base class (``AVTask``) in subclass mode unless they hold a
        ``_class_path``; ours are plain init-argument dicts, so it failed with "Option 'head...' is not accepted".
        Here the class comes from ``_class_path`` if present, else from the config, and only its ``__init__``
        arguments are merged.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        model_cfg = self.config[subcommand].get("model")
        class_path = hparams.pop("_class_path", None) or (model_cfg.get("class_path") if model_cfg else None)
        if not hparams or not class_path:
            return
        module, _, name = class_path.rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
        init_args = {k: v for k, v in hparams.items() if k in accepted}
        update = {subcommand: {"model": {"class_path": class_path, "init_args": init_args}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyper-parameters of {ckpt_path} ({class_path}) failed!\n")
            raise

    def after_instantiate_classes(self) -> None:
        run = self.run_config
        if run.init_from:
            init_weights(self.model, run.init_from, strict=run.init_strict)

    def before_fit(self) -> None:
        run, fit_cfg = self.run_config, self.config_init["fit"]
        requested = fit_cfg.get("ckpt_path")
        if requested not in (None, "last"):
            return
        latest = latest_checkpoint(run.folder)
        if requested is None and run.resume == "never":
            if latest is not None:
                rank_zero_warn(f"{run.folder} already holds checkpoints (newest: {latest.name}); starting from scratch "
                               "and overwriting them as run.resume=never (--run.resume auto continues the run)")
            return
        if latest is not None:
            rank_zero_info(f"Resuming {run.name} from {latest}")
            fit_cfg["ckpt_path"] = str(latest)
        elif requested == "last":
            # Stock Lightning only warns here and trains from scratch (Lightning-AI/pytorch-lightning#18524).
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint in {run.folder} (last.ckpt, on_exception.ckpt, "
                                    "hpc_ckpt_*.ckpt); use --run.resume auto to start fresh when there is none")
        elif run.resume == "must":
            raise FileNotFoundError(f"run.resume=must but {run.folder} holds no checkpoint "
                                    "(checkpoints/last.ckpt, checkpoints/on_exception.ckpt, hpc_ckpt_*.ckpt)")
        else:
            rank_zero_info(f"No checkpoint in {run.folder}: starting {run.name} from scratch")

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
    if "state_dict" in ckpt and hasattr(model, "adapt_checkpoint"):  # single-task <-> multitask layouts
        ckpt = model.adapt_checkpoint(ckpt)
    if "state_dict" in ckpt:
        # The task's own hook first: it restores omitted frozen encoder weights and rebuilds parts that depend on
        # the checkpoint (AVQA builds its vocabulary-sized layers from the stored vocabularies).
        model.on_load_checkpoint(ckpt)
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
    argv = sys.argv[1:] if args is None else args
    # Field docstrings of our config dataclasses become --help text (litgpt does the same). Parsing them reads
    # the source of every config class (about a second per start), so only when help is asked for.
    wants_help = isinstance(argv, (list, tuple)) and any(
        str(a) in HELP_FLAGS or str(a).split("=")[0].endswith(".help") for a in argv)  # also --model.help X
    set_docstring_parse_options(attribute_docstrings=wants_help)
    try:
        AVMoECLI(
            AVTask,
            LightningDataModule,  # AVDataModule subclasses, or MultitaskDataModule combining them
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
