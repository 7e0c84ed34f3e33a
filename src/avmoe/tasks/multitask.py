"""Joint multitask training: one AVMoE backbone, one head per task, composed from the single-task modules.

The member tasks (``AVETask``, ``AVVPTask``, ``AVSTask``, ``AVQATask``) are built inside
:func:`~avmoe.tasks.base.shared_backbone`, so their heads, losses, metrics, uni-modal hooks and prediction code are
used as they are, around the one backbone this module owns. Each training step runs one task (the
:class:`~avmoe.datamodules.multitask.MultitaskDataModule` draws it, the same on every rank) and the batch says
which (``batch["task"]``).

DDP: the heads of the tasks not drawn in a step take no part in it. We run DDP with
``find_unused_parameters=True`` (the multitask configs set ``strategy: ddp_find_unused_parameters_true``) and keep
Lightning's ``zero_grad(set_to_none=True)``: a parameter no rank used keeps ``grad=None``, so Adam skips it and its
stale moments never move it. The alternative, adding ``0 * sum(unused parameters)`` to the loss, would give those
heads zero gradients that Adam turns into updates from old moments; it is deliberately not used.

Validation/test: one loader per task (Lightning's sequential mode); metrics are logged as ``val/<task>/<name>``
and the checkpoint monitor ``val/score`` is the mean over tasks of each task's own monitor metric divided by its
``reference_scores`` entry (default 1: every task monitor is a [0, 1] score to maximise).
"""

from __future__ import annotations

import importlib
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from avmoe.datamodules.batch import batch_size
from avmoe.models.config import AVMoEConfig
from avmoe.models.outputs import BackboneOutput
from avmoe.models.task_routing import install_task_routers, set_active_task
from avmoe.robustness.setting import apply_setting
from avmoe.tasks.base import (MEMBERS_KEY, OMITTED_KEY, AVTask, Batch, OptimConfig, Outputs, StepRecord, UnimodalConfig, plain,
                              shared_backbone)

TASK = "task"  # batch key naming the task of a batch (set by MultitaskDataModule and the eval steps)
Weighting = Literal["static", "uncertainty"]


def _router_key(key: str, name: Optional[str]) -> Optional[str]:
    """Multitask router key -> single-task key for task ``name`` (None: another task's router)."""
    marker = ".router.routers."
    if marker not in key:
        return key
    head, rest = key.split(marker, 1)
    task, _, tail = rest.partition(".")
    return f"{head}.router.{tail}" if task == name else None


def member_checkpoint(checkpoint: dict[str, Any], task: AVTask) -> dict[str, Any]:
    """A multitask checkpoint as a checkpoint of its member of ``task``'s class: the shared backbone (the member's
    routers when routing was per task) and that member's head; the other members are left out."""
    specs = (checkpoint.get("hyper_parameters") or {}).get("tasks") or {}
    names = [n for n, spec in specs.items() if str(spec.get("class_path", "")).rpartition(".")[2] == type(task).__name__]
    if len(names) != 1:
        raise ValueError(f"init_from: the multitask checkpoint has {len(names)} member(s) of class "
                         f"{type(task).__name__} ({names}; members: { {n: s.get('class_path') for n, s in specs.items()} })"
                         f"; exactly one is needed to initialise a single-task {type(task).__name__}")
    name = names[0]
    prefix, state = f"tasks.{name}.", {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(prefix):
            state[key[len(prefix):]] = value
        elif key.startswith("backbone."):
            mapped = _router_key(key, name)
            if mapped is not None:
                state[mapped] = value
    omitted = [p[len(prefix):] if p.startswith(prefix) else p for p in checkpoint.get(OMITTED_KEY, ())
               if p.startswith((prefix, "backbone."))]
    rank_zero_info(f"init_from: multitask member {name!r} -> {type(task).__name__} (other members left out)")
    return {**checkpoint[MEMBERS_KEY].get(name, {}), "state_dict": state, OMITTED_KEY: omitted,
            "hyper_parameters": specs[name].get("init_args", {})}


def build_member(name: str, spec: dict[str, Any], unimodal: UnimodalConfig) -> AVTask:
    """Instantiate one member task from ``{"class_path": ..., "init_args": {...}}`` (inside ``shared_backbone``)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"multitask: tasks.{name} must be a mapping with class_path (and init_args), got {spec!r}")
    init_args = dict(spec.get("init_args") or {})
    for shared in ("backbone", "optim"):
        if shared in init_args:
            raise ValueError(f"multitask: tasks.{name}.init_args.{shared} is not allowed: the {shared} is shared by "
                             f"all tasks; set it once as model.init_args.{shared}")
    init_args.setdefault("unimodal", plain(unimodal))
    module, _, cls_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "avmoe.tasks"), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"multitask: tasks.{name}.class_path {spec['class_path']!r} does not name a class") from err
    if not (isinstance(cls, type) and issubclass(cls, AVTask)) or issubclass(cls, MultitaskModule):
        raise ValueError(f"multitask: tasks.{name}.class_path {spec['class_path']!r} is not a single-task AVTask")
    return cls(**init_args)


class MultitaskModule(AVTask):
    """One AVMoE backbone trained on several tasks at once, each with its own head.

    Args:
        tasks: member tasks by name, each ``{"class_path": "avmoe.tasks.AVETask", "init_args": {...}}`` without
            ``backbone`` / ``optim`` (shared). Names must match the multitask DataModule's.
        backbone: the shared backbone (adapter configuration per run).
        optim: optimizer and schedule for every trainable parameter.
        loss_weighting: ``static`` (``loss_weights``) or ``uncertainty`` (Kendall et al., CVPR 2018: learned
            ``s_t = log sigma_t^2``, loss ``exp(-s_t) L_t + s_t / 2``; the ``s_t`` in their own parameter group
            without weight decay).
        loss_weights: static weight per task (missing tasks: 1).
        task_routers: task-conditioned routing: every MoE adapter gets one router per task over the shared
            experts (each starts as a copy of the shared router).
        reference_scores: divisor of each task's monitor metric in ``val/score`` (missing tasks: 1).
        unimodal: uni-modal predictions of the member tasks that do not set their own.
    """

    monitor = "val/score"
    monitor_mode = "max"

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]],
        backbone: AVMoEConfig = AVMoEConfig(),
        optim: OptimConfig = OptimConfig(),
        loss_weighting: Weighting = "static",
        loss_weights: Optional[dict[str, float]] = None,
        task_routers: bool = False,
        reference_scores: Optional[dict[str, float]] = None,
        unimodal: UnimodalConfig = UnimodalConfig(),
    ) -> None:
        super().__init__(backbone=backbone, optim=optim, unimodal=unimodal)
        if not tasks:
            raise ValueError("multitask: give at least one task under model.init_args.tasks")
        if loss_weighting not in ("static", "uncertainty"):
            raise ValueError(f"multitask: loss_weighting must be 'static' or 'uncertainty', got {loss_weighting!r}")
        with shared_backbone(self.backbone):
            self.tasks = nn.ModuleDict({name: build_member(name, spec, self.unimodal) for name, spec in tasks.items()})
        for label, table in (("loss_weights", loss_weights), ("reference_scores", reference_scores)):
            unknown = sorted(set(table or {}) - set(self.tasks))
            if unknown:
                raise ValueError(f"multitask: {label} names unknown task(s) {unknown}; tasks are {list(self.tasks)}")
        self.loss_weighting = loss_weighting
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in self.tasks}
        self.reference_scores = {name: float((reference_scores or {}).get(name, 1.0)) for name in self.tasks}
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.tasks}) \
            if loss_weighting == "uncertainty" else None
        self.task_routers = task_routers
        self.current_task: Optional[str] = None
        if task_routers:
            install_task_routers(self.backbone, list(self.tasks))
        self.save_hyperparameters(plain({
            "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "tasks": tasks, "backbone": self.backbone_config, "optim": self.optim, "loss_weighting": loss_weighting,
            "loss_weights": loss_weights, "task_routers": task_routers, "reference_scores": reference_scores,
            "unimodal": self.unimodal}))

    # ---- composition ---------------------------------------------------------------------------------------
    def build_metrics(self) -> nn.ModuleDict:
        """No metrics of its own: each member task keeps its split metrics."""
        return nn.ModuleDict()

    def member(self, batch: Batch) -> AVTask:
        """The member task of ``batch`` (``batch["task"]``), with the backbone routed for it."""
        name = batch.get(TASK)
        if name not in self.tasks:
            raise KeyError(f"multitask: batch task {name!r} is not one of {list(self.tasks)}")
        if self.task_routers:
            set_active_task(self.backbone, name)
        self.current_task = name  # read by RouterUsage to split router statistics by task
        return self.tasks[name]

    def setup(self, stage: str) -> None:
        """Attach the Trainer and each task's own DataModule to the members, then run their ``setup``."""
        dm = self.trainer.datamodule
        members = getattr(dm, "tasks", None)
        if not isinstance(members, dict) or set(members) != set(self.tasks):
            raise ValueError(f"multitask: the DataModule must be a MultitaskDataModule with the tasks "
                             f"{sorted(self.tasks)}; got {sorted(members) if isinstance(members, dict) else type(dm)}")
        for name, task in self.tasks.items():
            task.trainer = self.trainer
            task.__dict__["_task_datamodule"] = members[name]
            task.setup(stage)

    # ---- the task contract, delegated to the batch's member --------------------------------------------------
    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        return self.member(batch).head_forward(feats, batch)

    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        return self.member(batch).compute_losses(outputs, batch)

    def make_metric(self) -> Any:
        """Unused (see :meth:`build_metrics`): metrics are per member task."""
        raise RuntimeError("MultitaskModule has no metric of its own; each member task has its metrics")

    def update_metric(self, metric: Any, outputs: Outputs, batch: Batch) -> None:
        self.member(batch).update_metric(metric, outputs, batch)

    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        return self.member(batch).sample_scores(outputs, batch)

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        return self.member(batch).sample_correct(outputs, batch)

    def unimodal_outputs(self, feats: BackboneOutput, batch: Batch, mode: Optional[str] = None) -> dict[str, Outputs]:
        return self.member(batch).unimodal_outputs(feats, batch, mode)

    def head_modality_modules(self) -> dict[str, list[nn.Module]]:
        """Every member head's modality-owned branches."""
        groups: dict[str, list[nn.Module]] = {"audio": [], "visual": []}
        for task in self.tasks.values():
            for modality, modules in task.head_modality_modules().items():
                groups[modality] += modules
        return groups

    # ---- training ----------------------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> tuple[BackboneOutput, Outputs, dict[str, Tensor]]:
        task = self.member(batch)
        feats, outputs = self(batch)  # this module's encode: its feature hooks (OPM, ...) apply
        return feats, outputs, task.loss_terms(feats, outputs, batch, self)

    def on_fit_start(self) -> None:
        if self.gradient_policy is not None:  # registered by its callback's on_fit_start, which runs first
            raise ValueError(f"MultitaskModule: {type(self.gradient_policy).__name__} is not supported on a multitask "
                             "module (its per-loss gradients assume one task's loss terms summed unweighted, while "
                             "a multitask step weights one sampled task's loss); use it on a single-task run")

    def weighted(self, name: str, loss: Tensor) -> Tensor:
        """The task loss as it enters the objective (static weight, or uncertainty weighting)."""
        if self.log_vars is None:
            return self.loss_weights[name] * loss
        s = self.log_vars[name]
        return torch.exp(-s) * loss + 0.5 * s

    def training_step(self, batch: Batch, batch_idx: int) -> Optional[Tensor]:
        if batch_size(batch) == 0:
            return self.empty_step_loss()
        name = batch[TASK]
        feats, outputs, losses = self.training_losses(batch)
        task_loss = torch.stack(list(losses.values())).sum()
        loss = self.weighted(name, task_loss) + feats.aux_loss
        bs = batch_size(batch)
        # Each task's terms are logged only on its own steps, so their epoch means are unbiased.
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"train/{name}/loss", task_loss, batch_size=bs)
        for term, value in losses.items():
            self.log(f"train/{name}/{term}", value, batch_size=bs)
        if self.log_vars is not None:
            self.log(f"train/{name}/log_var", self.log_vars[name].detach(), batch_size=bs)
        if self.record_steps:
            self.last_step = StepRecord(feats.detach(), {k: v.detach() for k, v in outputs.items()}, batch)
        return loss

    def configure_optimizers(self) -> Any:
        """The base recipe over every trainable parameter; uncertainty log-variances without weight decay."""
        log_vars = {id(p) for p in self.log_vars.parameters()} if self.log_vars is not None else set()
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in log_vars]
        groups: list[dict[str, Any]] = [{"params": params}]
        if log_vars:
            groups.append({"params": list(self.log_vars.parameters()), "weight_decay": 0.0})
        opt = torch.optim.Adam(groups, lr=self.optim.lr, betas=tuple(self.optim.betas),
                               weight_decay=self.optim.weight_decay)
        if not self.optim.step_size:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.optim.step_size, gamma=self.optim.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- evaluation --------------------------------------------------------------------------------------------
    def eval_task_names(self) -> list[str]:
        """Task of each evaluation dataloader index (the DataModule's order)."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        return list(getattr(dm, "tasks", None) or self.tasks)

    def _eval_batch(self, batch: Batch, dataloader_idx: int, split: str) -> None:
        if batch_size(batch) == 0:
            return
        name = self.eval_task_names()[dataloader_idx]
        batch[TASK] = name
        batch = apply_setting(self.eval_setting, self, batch)  # robustness condition, as for every task
        loss, _ = self.member(batch).eval_update(batch, split)
        self.log(f"{split}/{name}/loss", loss, batch_size=batch_size(batch), sync_dist=True,
                 add_dataloader_idx=False)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch, dataloader_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch, dataloader_idx, "test")

    def _log_metric(self, split: str) -> None:
        scores = []
        for name, task in self.tasks.items():
            values = task.compute_metrics(split)
            for key, value in values.items():
                self.log(f"{split}/{name}/{key}", value, sync_dist=False, add_dataloader_idx=False)
            key = task.monitor.split("/")[-1]
            if key in values:
                sign = 1.0 if task.monitor_mode == "max" else -1.0
                scores.append(sign * values[key].float() / self.reference_scores[name])
        if scores:
            self.log(f"{split}/score", torch.stack(scores).mean(), prog_bar=True, sync_dist=False,
                     add_dataloader_idx=False)

    def metrics_details(self, split: str) -> dict[str, Any]:
        """Each member's per-class results of ``split`` (metrics JSON ``details``), by task."""
        details = {name: task.metrics_details(split) for name, task in self.tasks.items()}
        return {name: d for name, d in details.items() if d}

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        raise NotImplementedError("multitask predict is not supported: predict with a single-task module "
                                  "initialised from this checkpoint (run.init_from)")

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def frozen_pretrained_prefixes(self) -> list[str]:
        """The shared encoders plus each member's own frozen parts (e.g. AVQA's text model), under ``tasks.<name>.``."""
        prefixes = super().frozen_pretrained_prefixes()
        for name, task in self.tasks.items():
            prefixes += [f"tasks.{name}.{p}" for p in task.frozen_pretrained_prefixes() if not p.startswith("backbone.")]
        return prefixes

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        extras = {}
        for name, task in self.tasks.items():  # what each member adds to a checkpoint (AVQA: its vocabularies)
            sub: dict[str, Any] = {"state_dict": {}}
            task.on_save_checkpoint(sub)
            extras[name] = {k: v for k, v in sub.items() if k not in ("state_dict", OMITTED_KEY)}
        checkpoint[MEMBERS_KEY] = extras

    def adapt_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A single-task checkpoint as a multitask one (``run.init_from``): its backbone (its router copied to every
        task's routers when routing is per task) and its head into the member it fits; the other members keep
        their initialisation (reported)."""
        if MEMBERS_KEY in checkpoint:
            return checkpoint
        state = checkpoint["state_dict"]
        extras = {k: v for k, v in checkpoint.items() if k not in ("state_dict", OMITTED_KEY, "hyper_parameters",
                                                                    "loops", "optimizer_states", "lr_schedulers",
                                                                    "callbacks", "datamodule_state")}
        class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        names = [n for n, t in self.tasks.items() if not class_path or class_path.endswith(type(t).__name__)]
        for name in names:  # vocabulary-sized heads (AVQA) are built from the checkpoint before shapes are compared
            self.tasks[name].on_load_checkpoint({"state_dict": {}, **extras})
        own = self.state_dict()
        head_keys = [k for k in state if not k.startswith("backbone.")]
        fits = [n for n in names if all(f"tasks.{n}.{k}" in own and own[f"tasks.{n}.{k}"].shape == state[k].shape
                                        for k in head_keys)]
        if len(fits) != 1:
            raise ValueError(f"init_from: the single-task checkpoint's head fits {len(fits)} member(s) ({fits}) of "
                             f"{list(self.tasks)}; exactly one is needed")
        name, new = fits[0], {}
        for key, value in state.items():
            if not key.startswith("backbone."):
                new[f"tasks.{name}.{key}"] = value
            elif self.task_routers and ".router." in key:
                head, tail = key.split(".router.", 1)
                new.update({f"{head}.router.routers.{n}.{tail}": value for n in self.tasks})
            else:
                new[key] = value
        kept = sorted(n for n in self.tasks if n != name)
        new.update({k: v for k, v in own.items() if k.startswith(tuple(f"tasks.{n}." for n in kept))})
        rank_zero_info(f"init_from: single-task checkpoint -> member {name!r}; members {kept} keep their "
                       f"initialisation")
        omitted = [p if p.startswith("backbone.") else f"tasks.{name}.{p}" for p in checkpoint.get(OMITTED_KEY, ())]
        return {"state_dict": new, OMITTED_KEY: omitted, MEMBERS_KEY: {name: extras}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, task in self.tasks.items():  # members first: AVQA builds its vocabulary-sized head here
            task.on_load_checkpoint({"state_dict": {}, **checkpoint.get(MEMBERS_KEY, {}).get(name, {})})
        super().on_load_checkpoint(checkpoint)
