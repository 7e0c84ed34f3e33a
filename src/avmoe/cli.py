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
SIGTERM or Ctrl-C writes a checkpoint at the next step boundary that every rank agrees on and the process exits
with 143 (130 for Ctrl-C); SLURM's requeue signal writes one there and requeues (``avmoe.callbacks.preemption``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import avmoe.datamodules  # noqa: F401  (registers the DataModule subclasses for class_path shorthands)
import avmoe.tasks  # noqa: F401
from avmoe.callbacks.checkpointing import LatestCheckpoint, latest_checkpoint, run_checkpoints
from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.callbacks.parameters import ParameterSummary
from avmoe.callbacks.preemption import Preemption, stop_exit_code
from avmoe.callbacks.progress import default_progress_bar
from avmoe.callbacks.router_usage import RouterUsage
from avmoe.callbacks.robustness import RobustEval, run_sweep
from avmoe.callbacks.seeding import StepSeeding
from avmoe.callbacks.tf32 import TF32Matmul
from avmoe.ckpt_hparams import describe_overrides, merge_hparams
from avmoe.errors import DEBUG_ENV, debug_enabled, user_error_message
from avmoe.quiet import quiet_known_warnings
from avmoe.robustness.sweep import RobustnessConfig, as_robustness
from lightning.pytorch import LightningDataModule
from avmoe.tasks.base import AVTask

SIGTERM_EXIT_CODE = 143
CLI_DESCRIPTION = """avmoe: AVMoE audio-visual learning (AVE, AVVP, AVS, AVQA) on PyTorch Lightning.

Subcommands: fit (train; --run.resume auto continues a run), validate, test, predict (--ckpt_path CKPT; predict
also takes --data.init_args.predict_dir DIR of your own mp4 files, AVQA with --data.init_args.predict_questions
FILE), and select (cold-start selection of
a labelled subset, own options: 'select --help'). '<subcommand> --help' lists every option,
'<subcommand> --config lightning_configs/demo.yaml --print_config' the resolved config. Each run lives in
<run.root>/<run.name>: config.yaml, checkpoints/, metrics/, router_usage/, parameters.json, metrics.csv and
TensorBoard events. AVMOE_DEBUG=1 shows full tracebacks."""
CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")  # resolved by Lightning, not files
HELP_FLAGS = ("-h", "--help", "--print_config=comments")


@dataclass
class RunConfig:
    """Where a run lives and how it starts."""

    name: str = "default"
    """Run folder name: config.yaml, TensorBoard events, checkpoints/ and metrics/ go to <root>/<name>."""
    root: str = "runs"
    """Folder holding the run folders."""
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
    router_usage: bool = True
    """Record router / expert usage per MoE module and expert every epoch (RouterUsage: TensorBoard scalars and
    heat map, router_usage/{train,val}.json)."""
    tf32: bool = False
    """On a CUDA device, let fp32 matmuls and convolutions use TF32 tensor cores for the run (TF32Matmul sets
    torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32, restores them after). No effect on a
    CPU. On in trainer/gpu.yaml, ddp.yaml and multinode.yaml; --run.tf32 false keeps IEEE fp32."""
    overwrite: bool = False
    """fit only: start from scratch in a run folder that already holds a run, deleting its checkpoints, TensorBoard
    events, CSV logs and metrics first. Without it (and without resume / --ckpt_path) fit refuses to touch them."""

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name


def _run_config(value: Any) -> RunConfig:
    if isinstance(value, RunConfig):
        return value
    return RunConfig(**{k: v for k, v in dict(value).items() if k in RunConfig.__dataclass_fields__})


class AVMoECLI(LightningCLI):
    """LightningCLI with the run folder, resume modes, weights-only init and the JSON metrics writer."""

    def __init__(self, *args: Any, parser_class: Optional[type[LightningArgumentParser]] = None, **kwargs: Any) -> None:
        # AVMoEArgumentParser (defined below): --print_config shows the resolved checkpoint monitor
        super().__init__(*args, parser_class=parser_class or AVMoEArgumentParser, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(RunConfig, "run")
        add_best_checkpoint_args(parser)
        parser.add_class_arguments(RobustnessConfig, "robustness")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        resolve_best_checkpoint(config, _run_config(config.get("run")))

    # ---- robustness evaluation (missing modalities, corruptions, attacks, sweeps) --------------------------------
    @property
    def robustness_config(self) -> RobustnessConfig:
        return as_robustness(self._get(self.config_init, "robustness", default=None))

    def _robustness_callbacks(self) -> list[Callback]:
        robust = self.robustness_config
        return [RobustEval(robust.setting, str(self.run_config.folder / "metrics"))] if robust.active else []

    def after_test(self) -> None:
        """With ``robustness.sweep``: the test that just ran is the clean row; re-test per setting."""
        robust = self.robustness_config
        if robust.sweep and not self.trainer.interrupted:
            run_sweep(self.trainer, self.model, self.datamodule, robust.sweep,
                      self.run_config.folder / "metrics" / "robustness.json",
                      tensorboard_dir=self.run_config.folder / "robustness",
                      clean={k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")})

    @property
    def run_config(self) -> RunConfig:
        return _run_config(self._get(self.config_init, "run"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        run = self.run_config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = run_loggers(run) if self.subcommand in (None, "fit") else False
        kwargs.setdefault("default_root_dir", str(run.folder))
        if self.robustness_config.attacks:  # attacks take input gradients inside the eval loops
            kwargs["inference_mode"] = False
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": config_filename(self.subcommand)}
        existing = list(config.get("callbacks") or []) + list(callbacks)
        callbacks = callbacks + self._run_callbacks(existing, config)
        trainer = super()._instantiate_trainer(config, callbacks)
        if self.run_config.step_seeding and not any(isinstance(c, StepSeeding) for c in trainer.callbacks):
            trainer.callbacks.insert(0, StepSeeding())  # first: before any other on_train_batch_start
        return trainer

    def _run_callbacks(self, existing: list[Callback], config: dict[str, Any]) -> list[Callback]:
        run = self.run_config
        ckpt_dir = run.folder / "checkpoints"
        extra: list[Callback] = [MetricsJSON(str(run.folder / "metrics"), subcommand=self.subcommand or "fit"),
                                 *self._robustness_callbacks()]
        # best.ckpt is the `checkpoint` section (add_best_checkpoint_args), first of the callbacks added here, so
        # trainer.checkpoint_callback (test_after_fit, --ckpt_path best) is that one.
        if not any(isinstance(c, LatestCheckpoint) for c in existing):
            extra.append(LatestCheckpoint(dirpath=str(ckpt_dir)))
            if run.checkpoint_every_n_steps:
                extra.append(LatestCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=run.checkpoint_every_n_steps))
        if config.get("enable_checkpointing") is not False and not any(
                isinstance(c, (OnExceptionCheckpoint, Preemption)) for c in existing):
            extra.append(Preemption(dirpath=str(ckpt_dir)))
        if run.tf32 and not any(isinstance(c, TF32Matmul) for c in existing):
            extra.append(TF32Matmul())
        if run.router_usage and not any(isinstance(c, RouterUsage) for c in existing):
            extra.append(RouterUsage(str(run.folder / "router_usage")))
        if config.get("enable_model_summary") in (None, True) and not any(isinstance(c, ModelSummary)
                                                                         for c in existing):
            extra.append(ParameterSummary(str(run.folder / "parameters.json")))
        wants_bar = config.get("enable_progress_bar") in (None, True)
        if wants_bar and not any(isinstance(c, ProgressBar) for c in existing):
            extra.append(default_progress_bar())
        return extra

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        self._given_args = sys.argv[1:] if args is None else args  # for _user_model_args
        super().parse_arguments(parser, args)

    def _user_model_args(self, subcommand: str) -> dict[str, Any]:
        """The model options the user gave (config files, flags, environment), without any default."""
        args = self._given_args
        if isinstance(args, (dict, Namespace)):
            given = dict(args).get(subcommand, {}) or {}
            model = dict(given).get("model") or {}
        else:
            args = [str(a) for a in args]
            rest = args[args.index(subcommand) + 1:] if subcommand in args else args
            model = self._subcommand_parsers[subcommand].parse_args(rest, defaults=False).get("model") or {}
        return model.as_dict() if isinstance(model, Namespace) else dict(model)

    def _parse_ckpt_path(self) -> None:
        """Rebuild the trained architecture from ``--ckpt_path``'s hyper-parameters, as defaults only.

        Class defaults < the checkpoint's hyper-parameters < what the user gave (config file, flag): an eval switch
        or a moved weights folder given on the command line wins, and each override of a stored value is printed
        (stock LightningCLI merges the checkpoint over the command line and silently drops them). The class comes
        from the user's config, else from the checkpoint's ``_class_path``; only its ``__init__`` arguments are
        merged (stock LightningCLI validates against ``AVTask`` and fails on plain init-argument dicts).
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in CKPT_PATH_KEYWORDS and "://" not in ckpt_path \
                and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        stored_class = hparams.pop("_class_path", None)
        given = self._user_model_args(subcommand)
        model_cfg = self.config[subcommand].get("model")
        class_path = given.get("class_path") or stored_class or (model_cfg.get("class_path") if model_cfg else None)
        if not hparams or not class_path:
            return
        module, _, name = class_path.rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
        init_args, overrides = merge_hparams({k: v for k, v in hparams.items() if k in accepted},
                                             given.get("init_args") or {})
        if overrides:
            rank_zero_info(describe_overrides(ckpt_path, overrides))
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
        if requested is None and run.resume == "never":
            claim_run_folder(run)
            return
        latest = latest_checkpoint(run.folder)  # the newest loadable one (newer unloadable ones are named)
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


class AVMoEArgumentParser(LightningArgumentParser):
    """Dumps (``--print_config``, ``config.yaml``) show the ``checkpoint`` section as it will be instantiated: the
    run folder's ``dirpath`` and the task's ``monitor`` / ``mode`` where the user set none
    (:func:`resolve_best_checkpoint`; jsonargparse prints ``--print_config`` before any hook of the CLI runs)."""

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and cfg.get("checkpoint") is not None and cfg.get("run") is not None:
            cfg = cfg.clone()
            try:
                resolve_best_checkpoint(cfg, _run_config(cfg.get("run")))
            except (ImportError, AttributeError, TypeError, ValueError):
                pass  # an unknown model class or a malformed run section: validation reports it, not the dump
        return super().dump(cfg, *args, **kwargs)


def add_best_checkpoint_args(parser: Any) -> None:
    """The ``checkpoint`` section: the ModelCheckpoint writing ``checkpoints/best.ckpt``, visible in config.yaml and
    ``--print_config`` and overridable (``--checkpoint.monitor val/loss --checkpoint.mode min``)."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.filename": "best", "checkpoint.enable_version_counter": False,
                         "checkpoint.monitor": None, "checkpoint.dirpath": None})


def resolve_best_checkpoint(config: Any, run: RunConfig) -> None:
    """Fill the ``checkpoint`` section's unset values before it is instantiated (and saved in config.yaml):
    ``dirpath`` = ``<run folder>/checkpoints``; ``monitor`` / ``mode`` = the task's (``AVETask.monitor`` ...)."""
    section, model = config.get("checkpoint"), config.get("model")
    if section is None:
        return
    if section.get("dirpath") is None:
        section["dirpath"] = str(run.folder / "checkpoints")
    class_path = model.get("class_path") if model is not None else None
    if section.get("monitor") is None and class_path:
        module, _, name = class_path.rpartition(".")
        task = getattr(importlib.import_module(module), name)
        section["monitor"], section["mode"] = task.monitor, task.monitor_mode


def run_loggers(run: RunConfig) -> list[Any]:
    """fit's TensorBoard events and ``metrics.csv`` (plot curves without TensorBoard), in the run folder itself.

    validate / test / predict log nothing by default: their record is ``metrics/<subcommand>_<split>.json`` (and
    ``predictions/``), and a logger would rewrite the fit's ``metrics.csv`` and ``hparams.yaml``."""
    return [TensorBoardLogger(save_dir=run.root, name=run.name, version="", default_hp_metric=False),
            CSVLogger(save_dir=run.root, name=run.name, version="")]


def config_filename(subcommand: Optional[str]) -> str:
    """``config.yaml`` is the fit's record; ``validate`` / ``test`` / ``predict`` write ``config.<subcommand>.yaml``."""
    return "config.yaml" if subcommand in (None, "fit") else f"config.{subcommand}.yaml"


def claim_run_folder(run: RunConfig) -> None:
    """A fresh fit (no resume, no --ckpt_path) in ``run.folder``: refuse when a run is there, unless overwrite.

    Overwriting would mix two runs: checkpoints replaced, a second set of TensorBoard events (overlapping curves).
    Only the global rank zero checks and deletes (ranks started by the DDP launcher see the folder rank zero has
    begun to fill).
    """
    if rank_zero_only.rank != 0:
        return
    records = run_records(run.folder)
    if not records:
        return
    if not run.overwrite:
        names = ", ".join(sorted(str(p.relative_to(run.folder)) for p in records)[:4])
        raise FileExistsError(
            f"run folder {run.folder} already holds a run ({names}{', ...' if len(records) > 4 else ''}). Choose: "
            f"--run.resume auto (continue it), a new --run.name, or --run.overwrite true (delete it and start over)")
    rank_zero_warn(f"run.overwrite: deleting {len(records)} files of the previous run in {run.folder}")
    for path in records:
        path.unlink()


def run_records(folder: Path) -> list[Path]:
    """The files a fit leaves in its run folder: checkpoints, TensorBoard events, CSV logs, metrics JSON."""
    patterns = ("checkpoints/*.ckpt", "hpc_ckpt_*.ckpt", "events.out.tfevents.*", "metrics/*.json", "metrics.csv",
                "router_usage/*")
    return [p for pattern in patterns for p in folder.glob(pattern) if p.is_file()]


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
    if isinstance(argv, (list, tuple)) and argv and str(argv[0]) == "select":  # cold-start selection, own parser
        from avmoe.select.command import select_main  # noqa: PLC0415

        select_main([str(a) for a in argv[1:]])
        return
    # Field docstrings of our config dataclasses become --help text (litgpt does the same). Parsing them reads
    # the source of every config class (about a second per start), so only when help is asked for.
    wants_help = isinstance(argv, (list, tuple)) and any(
        str(a) in HELP_FLAGS or str(a).split("=")[0].endswith(".help") for a in argv)  # also --model.help X
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_help)  # jsonargparse >= 4.39
    quiet_known_warnings()
    try:
        AVMoECLI(
            AVTask,
            LightningDataModule,  # AVDataModule subclasses, or MultitaskDataModule combining them
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=True,  # --optimizer / --lr_scheduler replace the task's optim defaults
            parser_kwargs={"default_env": True, "description": CLI_DESCRIPTION,
                           "prog": _prog()},
            args=args,
        )
    except SIGTERMException:
        # Lightning 2.6.6 turns SIGTERM into a clean exit (code 0); requeue wrappers need to see the kill:
        # 143 (SIGTERM), 130 (Ctrl-C only).
        sys.exit(stop_exit_code(SIGTERM_EXIT_CODE))
    except Exception as err:  # noqa: BLE001 - only errors the user caused are shortened, the rest re-raised
        if args is None:  # the console scripts; a call from Python (args given) keeps its exception
            _exit_on_user_error(err)
        raise


def _prog() -> str:
    """``lightning`` / ``avmoe`` as invoked; ``python -m avmoe`` for the module form."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "avmoe"
    return "python -m avmoe" if name == "__main__.py" else name


def _exit_on_user_error(err: BaseException) -> None:
    """A missing root / weights folder / checkpoint or a bad option: one line on stderr and exit code 1."""
    message = None if debug_enabled() else user_error_message(err)
    if message is not None:
        sys.stderr.write(f"error: {message}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
