"""Shared LightningModule for every audio-visual task.

The base owns the backbone, the optimizer, logging, split metrics and the *modality contract* that the
balancing callbacks rely on:

- :meth:`AVTask.modality_parameters` -> ``{"audio": [...], "visual": [...]}`` by module ownership;
- :meth:`AVTask.unimodal_outputs` -> per-modality outputs, by the config choice ``unimodal.mode``: the task head
  with the other modality's features zeroed (``zero``), or auxiliary uni-modal heads trained alongside (``aux``);
- :meth:`AVTask.sample_scores` -> a per-sample score in [0, 1] (true-class probability, or ``exp(-loss)`` for
  tasks that are not single-label classification) and :meth:`AVTask.sample_correct` for valuation;
- ``feature_hooks``: callables ``(task, feats, batch) -> feats`` applied in training after the per-sample
  modality masks, which is where forward-time methods (OPM) act;
- ``last_step``: the detached features/outputs/batch of the latest training step when ``record_steps`` is on;
- ``loss_hooks``: callables ``(task, outputs, batch, losses) -> losses`` applied to the named training losses
  (add a term, or replace them: CRMT's margin regulariser and its stage-2 objective);
- ``eval_setting``: the robustness condition (:class:`avmoe.robustness.EvalSetting`: missing modality, corruption,
  attack) applied to every validation / test / predict batch before the forward pass; None = clean.

Subclasses implement :meth:`head_forward`, :meth:`compute_losses`, :meth:`make_metric`,
:meth:`update_metric` and :meth:`sample_scores`, and for ``unimodal.mode: aux`` :meth:`make_unimodal_head`,
:meth:`unimodal_head_forward` and :meth:`unimodal_sample_loss` (calling :meth:`build_unimodal_heads` once their
head exists).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Protocol, TypeVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric

from avmoe.datamodules.batch import AUDIO_MASK, INDEX, MODALITIES, VISUAL_MASK, batch_size
from avmoe.metrics.unimodal import UnimodalCorrectness
from avmoe.models.avmoe import AVMoEBackbone
from avmoe.models.config import AVMoEConfig
from avmoe.models.outputs import BackboneOutput
from avmoe.files import write_json_atomic
from avmoe.robustness.setting import EvalSetting, apply_setting
from avmoe.tasks.predictions import gather_records

Batch = dict[str, Any]
Outputs = dict[str, Tensor]
FeatureHook = Callable[["AVTask", BackboneOutput, Batch], BackboneOutput]
LossHook = Callable[["AVTask", Outputs, Batch, dict[str, Tensor]], dict[str, Tensor]]


class GradientPolicy(Protocol):
    """Replaces the module's backward for methods that need per-loss gradients (MMPareto).

    ``training_losses`` may add named loss terms to a training step (they are summed into the loss and logged);
    ``backward`` then receives the loss Lightning would backpropagate (divided for accumulation, scaled by AMP)
    together with the named terms it is the sum of, and must leave the gradients in ``.grad``. Under DDP, on a
    rank whose batch had no usable sample (:meth:`AVTask.empty_step_loss`), ``backward`` receives the zero loss
    and no terms (``{}``): it must still run the collectives the other ranks run in that step, in the same order.
    """

    def training_losses(self, task: "AVTask", feats: BackboneOutput, outputs: "Outputs", batch: "Batch",
                        losses: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def backward(self, task: "AVTask", loss: Tensor, terms: dict[str, Tensor]) -> None: ...
C = TypeVar("C")
OMITTED_KEY = "omitted_frozen_prefixes"  # checkpoint entry naming the encoder weights left out of it
MEMBERS_KEY = "multitask_members"  # multitask checkpoints: what each member task's own checkpoint hook stored
_SHARED_BACKBONE: ContextVar[Optional[AVMoEBackbone]] = ContextVar("avmoe_shared_backbone", default=None)


@contextmanager
def shared_backbone(backbone: AVMoEBackbone) -> Iterator[None]:
    """Tasks constructed inside this context use ``backbone`` (not registered as their submodule, so its weights
    appear once in the owner's state dict) instead of building their own; their ``backbone`` argument is ignored.
    This is how :class:`avmoe.tasks.MultitaskModule` composes task modules around one backbone."""
    token = _SHARED_BACKBONE.set(backbone)
    try:
        yield
    finally:
        _SHARED_BACKBONE.reset(token)


@dataclass
class OptimConfig:
    """Adam on the trainable parameters with an optional per-epoch StepLR (the official recipe).

    The command line's ``--optimizer`` / ``--lr_scheduler`` (LightningCLI) replace it entirely when given."""

    lr: float = 5e-4
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay (L2, as ``torch.optim.Adam``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    step_size: Optional[int] = 3
    """StepLR period in epochs; None keeps the learning rate constant."""
    gamma: float = 0.35
    """StepLR factor applied every ``step_size`` epochs."""


UNIMODAL_MODES = ("zero", "split", "aux")


@dataclass
class UnimodalConfig:
    """Where the per-modality predictions (OGM/OPM scores, valuation) come from."""

    mode: Literal["zero", "split", "aux"] = "zero"
    """``zero``: the task head with the other modality's features zeroed (any head, no extra parameters);
    ``split``: the official split of a linear fusion of concatenated features, ``x_u W_u^T + b/2`` at that layer
    (OGM-GE ``main.py``, BML ``Classifier.py``; only heads that have one: AVQA's ``fusion``);
    ``aux``: auxiliary uni-modal heads (one per modality, on that modality's features) trained with their own
    losses next to the task loss."""
    aux_weight: float = 1.0
    """Weight of each auxiliary head's loss in the training loss (``aux`` only)."""
    detach: bool = False
    """``aux`` only: train the auxiliary heads on detached features, i.e. as probes whose losses never reach the
    backbone (the uni-modal scores then measure the features without changing how they are trained)."""
    eval_correctness: bool = True
    """Log ``{val,test}/unimodal_audio`` and ``unimodal_visual``: each modality's mean ``sample_correct`` alone,
    from this mode's predictions, every sample once (zero mode costs two extra head passes per eval batch)."""

    def __post_init__(self) -> None:
        if self.mode not in UNIMODAL_MODES:
            raise ValueError(f"unimodal.mode must be one of {UNIMODAL_MODES}, got {self.mode!r}")


@dataclass
class StepRecord:
    """What the latest training step saw (detached), for callbacks that need it after backward."""

    feats: BackboneOutput
    outputs: Outputs
    batch: Batch
    extras: dict[str, Any] = field(default_factory=dict)


def as_config(cls: type[C], value: Any) -> C:
    """Accept a dataclass instance or a (nested) dict, e.g. from ``load_from_checkpoint`` hyper-parameters.

    Always a fresh object: the instances in ``__init__`` signatures are evaluated once, so two modules built with
    the defaults would otherwise share (and mutate) one config object.
    """
    if isinstance(value, cls):
        return copy.deepcopy(value)
    if value is None:
        return cls()
    kwargs = {}
    for f in fields(cls):
        if f.name in value:
            v = value[f.name]
            sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            nested = is_dataclass(sub) and isinstance(v, dict)
            kwargs[f.name] = as_config(type(sub), v) if nested else copy.deepcopy(v)
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Dataclasses -> dicts, so checkpoints load with ``weights_only=True`` and hparams.yaml is readable."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


class AVTask(LightningModule, ABC):  # LightningModule's metaclass is ``type``: ABCMeta enforces the abstract methods
    """Backbone + task head + losses + metrics. Not used directly: pick a task class in the config."""

    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(self, backbone: AVMoEConfig, optim: OptimConfig, unimodal: UnimodalConfig = UnimodalConfig()) -> None:
        super().__init__()
        shared = _SHARED_BACKBONE.get()
        self.backbone_config = shared.config if shared is not None else as_config(AVMoEConfig, backbone)
        self.optim = as_config(OptimConfig, optim)
        self.unimodal = as_config(UnimodalConfig, unimodal)
        self.unimodal_heads: Optional[nn.ModuleDict] = None  # built by build_unimodal_heads (mode "aux")
        if shared is None:
            self.backbone = AVMoEBackbone(self.backbone_config)
        else:  # a plain attribute, not a submodule: the composing module owns (saves, moves, wraps) it
            self.__dict__["backbone"] = shared
        self.metrics = self.build_metrics()
        self.feature_hooks: list[FeatureHook] = []
        self.loss_hooks: list[LossHook] = []
        self.record_steps = False
        self.last_step: Optional[StepRecord] = None
        self.gradient_policy: Optional[GradientPolicy] = None  # set by a callback (MMPareto)
        self._policy_terms: Optional[dict[str, Tensor]] = None  # the named terms of the loss handed to backward
        self._prediction_records: list[dict[str, Any]] = []
        self.eval_setting: Optional[EvalSetting] = None  # robustness condition of val/test/predict batches

    def build_metrics(self) -> nn.ModuleDict:
        """Split metrics: ``{val,test}_metric`` (the task's official metric) and ``{val,test}_unimodal``."""
        metrics = nn.ModuleDict({"val_metric": self.make_metric(), "test_metric": self.make_metric()})
        if self.unimodal.eval_correctness:
            metrics.update({"val_unimodal": UnimodalCorrectness(), "test_unimodal": UnimodalCorrectness()})
        return metrics

    @property
    def task_datamodule(self) -> Any:
        """The DataModule feeding this task: the Trainer's, or the one a composing module assigned
        (``_task_datamodule``), e.g. the AVQA member of a multitask DataModule."""
        own = self.__dict__.get("_task_datamodule")
        if own is not None:
            return own
        return self.trainer.datamodule if self._trainer is not None else None

    # ---- task-specific pieces ---------------------------------------------------------------------------
    @abstractmethod
    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        """Run the task head on backbone features."""

    @abstractmethod
    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms (summed into the training loss)."""

    @abstractmethod
    def make_metric(self) -> Metric:
        """The official metric for this task (one instance per split)."""

    @abstractmethod
    def update_metric(self, metric: Metric, outputs: Outputs, batch: Batch) -> None:
        """Feed one batch to the split metric."""

    @abstractmethod
    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Per-sample score in [0, 1], higher is better, shape (B,)."""

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Per-sample correctness in [0, 1] (valuation). Defaults to :meth:`sample_scores`."""
        return self.sample_scores(outputs, batch)

    def make_unimodal_head(self, modality: str) -> nn.Module:
        """The auxiliary head of ``modality`` (``unimodal.mode: aux``)."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary uni-modal heads; use unimodal.mode: zero")

    def unimodal_head_forward(self, modality: str, feats: BackboneOutput, batch: Batch) -> Outputs:
        """Outputs of the auxiliary head of ``modality``, with the keys ``sample_scores``/``sample_correct`` read."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary uni-modal heads; use unimodal.mode: zero")

    def unimodal_sample_loss(self, modality: str, outputs: Outputs, batch: Batch) -> Tensor:
        """Per-sample training loss (B,) of an auxiliary head's outputs."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary uni-modal heads; use unimodal.mode: zero")

    crmt_unsupported: Optional[str] = None
    """Why the task's head cannot take CRMT (not a linear fusion of per-modality features); None: it can."""

    def refuse_crmt(self, crmt: bool) -> None:
        """``crmt: true`` on a task whose head is not a linear fusion: a ValueError with :attr:`crmt_unsupported`."""
        if crmt:
            raise ValueError(f"{type(self).__name__}: crmt: true is not available. {self.crmt_unsupported}")

    def crmt_logits(self, outputs: Outputs, batch: Batch) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """CRMT's view of the outputs: uni-modal logits ``{m: (N, C)}``, fused logits (N, C) and labels (N,) of the
        N samples that carry a class, and their row index (N,) in the batch. Tasks with a CRMT fusion head
        (``self.crmt_fusion``) implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no CRMT fusion head")

    def head_modality_modules(self) -> dict[str, list[nn.Module]]:
        """Head modules owned by one modality. Override when the head has uni-modal branches."""
        head = getattr(self, "head", None)
        return head.modality_modules() if hasattr(head, "modality_modules") else {"audio": [], "visual": []}

    # ---- forward ----------------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> BackboneOutput:
        """Backbone features with per-sample modality masks and (in training) the feature hooks applied."""
        feats = self.backbone(batch["video"], batch["audio"])
        feats = feats.with_modality_scale(audio=batch.get(AUDIO_MASK), visual=batch.get(VISUAL_MASK))
        if self.training:
            for hook in self.feature_hooks:
                feats = hook(self, feats, batch)
        return feats

    def forward(self, batch: Batch) -> tuple[BackboneOutput, Outputs]:
        feats = self.encode(batch)
        return feats, self.head_forward(feats, batch)

    # ---- modality contract ------------------------------------------------------------------------------
    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per modality, by module ownership (backbone adapters + head branches).

        Auxiliary uni-modal heads are classifiers, like the fused head's classifier, and belong to no group:
        gradient modulation acts on what produces the features, not on the read-outs that score them.
        """
        groups = self.backbone.modality_parameters()
        for modality, modules in self.head_modality_modules().items():
            groups[modality] = groups[modality] + [p for m in modules for p in m.parameters() if p.requires_grad]
        return groups

    def unimodal_outputs(self, feats: BackboneOutput, batch: Batch, mode: Optional[str] = None) -> dict[str, Outputs]:
        """Outputs of each modality alone, by ``mode`` (default ``unimodal.mode``): ``zero`` runs the task head with
        the other modality's features zeroed, ``aux`` runs the auxiliary heads."""
        mode = mode or self.unimodal.mode
        if mode == "split":
            return self._split_unimodal_outputs(feats, batch)
        if mode == "aux":
            if self.unimodal_heads is None:
                raise RuntimeError(f"{type(self).__name__}: auxiliary heads are not built (unimodal.mode is "
                                   f"{self.unimodal.mode!r})")
            return {m: self.unimodal_head_forward(m, feats, batch) for m in MODALITIES}
        return {"audio": self.head_forward(feats.drop("visual"), batch),
                "visual": self.head_forward(feats.drop("audio"), batch)}

    def split_fusion(self) -> Optional[tuple[nn.Linear, dict[str, slice]]]:
        """The head's linear fusion of concatenated features and each modality's input columns, or None."""
        head = getattr(self, "head", None)
        return head.split_fusion() if hasattr(head, "split_fusion") else None

    def _split_unimodal_outputs(self, feats: BackboneOutput, batch: Batch) -> dict[str, Outputs]:
        """Each modality's outputs with the fusion layer replaced by ``x_u W_u^T + b/2`` (official split head)."""
        split = self.split_fusion()
        if split is None:
            raise ValueError(f"unimodal.mode: split needs a head whose modalities meet in a linear layer on "
                             f"concatenated features; {type(self).__name__}'s head has none (use zero or aux)")
        layer, columns = split
        out = {}
        for modality in MODALITIES:
            cols = columns[modality]

            def own_half(module: nn.Module, args: tuple, _: Tensor, cols: slice = cols) -> Tensor:
                bias = None if module.bias is None else module.bias / len(columns)
                return nn.functional.linear(args[0][..., cols], module.weight[:, cols], bias)

            handle = layer.register_forward_hook(own_half)
            try:
                out[modality] = self.head_forward(feats, batch)
            finally:
                handle.remove()
        return out

    def build_unimodal_heads(self) -> None:
        """Create the auxiliary heads when ``unimodal.mode`` is ``aux`` (subclasses call it once the head exists)."""
        if self.unimodal.mode == "aux" and self.unimodal_heads is None:
            self.unimodal_heads = nn.ModuleDict({m: self.make_unimodal_head(m) for m in MODALITIES}).to(self.device)

    def unimodal_losses(self, feats: BackboneOutput, batch: Batch) -> dict[str, Tensor]:
        """Weighted auxiliary-head losses, each averaged over the samples that carry its modality.

        Samples whose modality was dropped (data-plan masks, OPM) are left out rather than taught to predict from
        zeros; with none left the loss is an exact zero that still touches every auxiliary parameter (DDP).
        """
        source = feats.detach() if self.unimodal.detach else feats
        losses = {}
        for modality in MODALITIES:
            outputs = self.unimodal_head_forward(modality, source, batch)
            per_sample = self.unimodal_sample_loss(modality, outputs, batch).float()  # (B,)
            keep = source.present(modality).to(per_sample.dtype)
            loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)
            losses[f"loss_aux_{modality}"] = self.unimodal.aux_weight * loss
        return losses

    # ---- loops ------------------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> tuple[BackboneOutput, Outputs, dict[str, Tensor]]:
        """Forward and the named training loss terms (task losses, then auxiliary-head losses)."""
        feats, outputs = self(batch)
        return feats, outputs, self.loss_terms(feats, outputs, batch, self)

    def loss_terms(self, feats: BackboneOutput, outputs: Outputs, batch: Batch, owner: "AVTask") -> dict[str, Tensor]:
        """This task's named loss terms of one forward, then ``owner``'s loss hooks (the module being trained:
        this task, or the multitask module whose member it is)."""
        losses = self.compute_losses(outputs, batch)
        if self.unimodal_heads is not None:
            losses.update(self.unimodal_losses(feats, batch))
        for hook in owner.loss_hooks:
            losses = hook(owner, outputs, batch, losses)
        return losses

    def empty_step_loss(self) -> Optional[Tensor]:
        """The training step of a batch whose every clip failed to decode (skip policy)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None  # no step on this batch
        # DDP: the other ranks wait in the gradient all-reduce of this step. An exact zero that touches every
        # trainable parameter runs it: this rank contributes a zero gradient (zero-weighted, not skipped).
        return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def training_step(self, batch: Batch, batch_idx: int) -> Optional[Tensor]:
        if batch_size(batch) == 0:  # every clip of this batch failed to decode under the skip policy
            return self.empty_step_loss()
        feats, outputs, losses = self.training_losses(batch)
        if self.gradient_policy is not None:
            losses = self.gradient_policy.training_losses(self, feats, outputs, batch, losses)
            self._policy_terms = {**losses, "load_balance": feats.aux_loss}
        loss = torch.stack(list(losses.values())).sum() + feats.aux_loss
        bs = batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs)
        if self.backbone_config.adapter.load_balance_weight > 0:
            self.log("train/load_balance", feats.aux_loss, batch_size=bs)
        if self.record_steps:
            self.last_step = StepRecord(feats.detach(), {k: v.detach() for k, v in outputs.items()}, batch)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, or the gradient policy's when one is plugged in (it sees the loss's named terms)."""
        terms, self._policy_terms = self._policy_terms, None
        if self.gradient_policy is not None:  # no terms: a DDP step without a usable sample on this rank
            self.gradient_policy.backward(self, loss, terms or {})
            return
        super().backward(loss, *args, **kwargs)

    def eval_update(self, batch: Batch, split: str) -> tuple[Tensor, Outputs]:
        """Forward one evaluation batch, update the ``split`` metrics; returns (summed loss, outputs)."""
        feats, outputs = self(batch)
        losses = self.compute_losses(outputs, batch)
        loss = torch.stack(list(losses.values())).sum()
        self.update_metric(self.metrics[f"{split}_metric"], outputs, batch)
        if self.unimodal.eval_correctness:  # how well each modality does alone (diagnostic, not the task metric)
            uni = self.unimodal_outputs(feats, batch)
            self.metrics[f"{split}_unimodal"].update(batch[INDEX], *(self.sample_correct(uni[m], batch).detach()
                                                                     for m in MODALITIES))
        return loss, outputs

    def _eval_step(self, batch: Batch, split: str) -> Outputs:
        if batch_size(batch) == 0:
            return {}
        batch = apply_setting(self.eval_setting, self, batch)
        loss, outputs = self.eval_update(batch, split)
        self.log(f"{split}/loss", loss, batch_size=batch_size(batch), sync_dist=True)
        return outputs

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def compute_metrics(self, split: str) -> dict[str, Tensor]:
        """The ``split`` metrics' values (synced over ranks by torchmetrics), then reset."""
        out: dict[str, Tensor] = {}
        for key in (f"{split}_metric", f"{split}_unimodal"):
            if key in self.metrics:
                metric = self.metrics[key]
                out.update(metric.compute())
                if key == f"{split}_metric" and hasattr(metric, "details"):  # per-class results, metrics JSON
                    self._details = {**getattr(self, "_details", {}), split: self.name_details(metric.details())}
                metric.reset()
        return out

    def _log_metric(self, split: str) -> None:
        for name, value in self.compute_metrics(split).items():
            self.log(f"{split}/{name}", value, prog_bar=name == self.monitor.split("/")[-1], sync_dist=False)

    def name_details(self, details: dict[str, Any]) -> dict[str, Any]:
        """Per-class results with class names instead of indices (tasks override; default: indices as strings)."""
        return {k: {str(c): v for c, v in d.items()} for k, d in details.items()}

    def metrics_details(self, split: str) -> dict[str, Any]:
        """The latest per-class results of ``split`` (``details`` of the split metric), for the metrics JSON."""
        return getattr(self, "_details", {}).get(split, {})

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val")

    def on_test_epoch_end(self) -> None:
        self._log_metric("test")

    # ---- prediction ---------------------------------------------------------------------------------------
    prediction_name: str = "task"  # file stem of <run folder>/predictions/<name>_predictions.json

    def predictions(self, batch: Batch, outputs: Outputs) -> dict[str, Any]:
        """What ``predict_step`` returns for a batch (``trainer.predict``). Tasks return their decoded predictions."""
        return {INDEX: batch[INDEX], **outputs}

    def prediction_records(self, batch: Batch, predictions: dict[str, Any]) -> list[dict[str, Any]]:
        """JSON-able records, one per sample with its ``index``, for the predictions file; [] writes no file."""
        return []

    def prediction_payload(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"num_samples": len(records), "predictions": records}

    def prediction_path(self) -> Path:
        return Path(self.trainer.default_root_dir) / "predictions" / f"{self.prediction_name}_predictions.json"

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        if batch_size(batch) == 0:  # every clip of the batch failed to decode (on_decode_error: skip)
            return {INDEX: batch[INDEX]}
        batch = apply_setting(self.eval_setting, self, batch)
        _, outputs = self(batch)
        result = self.predictions(batch, outputs)
        if self._trainer is not None:  # files go to the Trainer's run folder; a bare call only returns
            self._prediction_records.extend(self.prediction_records(batch, result))
        return result

    def on_predict_epoch_start(self) -> None:
        self._prediction_records = []

    def on_predict_epoch_end(self) -> None:
        """Gather every rank's records (padding removed by index) and write the file once, on rank zero."""
        records = gather_records(self._prediction_records, self.trainer.world_size)
        if records and self.trainer.is_global_zero:
            payload = {"checkpoint": str(Path(self.trainer.ckpt_path).resolve()) if self.trainer.ckpt_path else None,
                       **self.prediction_payload(records)}
            write_json_atomic(self.prediction_path(), payload, indent=1)
            rank_zero_info(f"predict: {len(records)} predictions written to {self.prediction_path()}")
        self._prediction_records = []

    # ---- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.optim.lr, betas=tuple(self.optim.betas),
                               weight_decay=self.optim.weight_decay, fused=True)  # one kernel for all tensors
        if not self.optim.step_size:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.optim.step_size, gamma=self.optim.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def frozen_pretrained_prefixes(self) -> list[str]:
        """State-dict prefixes of encoders that are frozen, in eval mode and loaded from local weights.

        Their weights are left out of checkpoints (Swin-V2-L alone is 780 MB) and restored from the same local
        weights when the model is rebuilt; random-init encoders are always saved, so demos and tests resume.
        """
        cfg, out = self.backbone_config, []
        if cfg.visual.pretrained and not (cfg.visual.trainable or cfg.visual.train_mode):
            out.append("backbone.visual_encoder.")
        if (cfg.audio.pretrained or cfg.audio.htsat_checkpoint) and not (cfg.audio.trainable or cfg.audio.train_mode):
            out.append("backbone.audio_encoder.")
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = tuple(self.frozen_pretrained_prefixes())
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]
            checkpoint[OMITTED_KEY] = list(prefixes)

    def adapt_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of another layout in this module's (``run.init_from``): a multitask checkpoint becomes this
        task's member (shared backbone + its head); anything else is returned as it is."""
        if MEMBERS_KEY not in checkpoint:
            return checkpoint
        from avmoe.tasks.multitask import member_checkpoint  # noqa: PLC0415 - multitask imports this module

        return member_checkpoint(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = tuple(checkpoint.get(OMITTED_KEY, ()))
        if prefixes:
            own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
            checkpoint["state_dict"].update(own)

    def parameter_counts(self) -> dict[str, int]:
        """Frozen and trainable parameter counts (README figures come from this)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
