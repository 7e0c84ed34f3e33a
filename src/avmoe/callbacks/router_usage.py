"""Router and expert usage of the AVMoE adapters, per MoE module and expert, per epoch.

For every MoE module (``<stage>.<position>.<a1|v1|a2|v2>``: audio / visual side, attention / MLP half) and expert
(cross-modal first, then unimodal, as :class:`~avmoe.models.moe.MoEAdapter` orders them), over all frames of an
epoch: the **mean router weight** and the **argmax share** (fraction of frames whose largest weight is that
expert). Logged as scalars (``router/<module>/e<k>_weight``, ``.../e<k>_top1``), as a module x expert heat map
image in TensorBoard, and as ``<run folder>/router_usage/<split>.json`` (every epoch appended). On a
:class:`~avmoe.tasks.MultitaskModule` everything is per task (``router/<task>/...``, ``<split>_<task>.json``, one
heat map per task per epoch), so one sees whether tasks route differently.

Sums stay on the device during the epoch (a forward hook adds each batch's (modules, experts) sums; no host
sync per step); one all-reduce and one copy to the host per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor

from avmoe.files import write_json_atomic

SIDES = ("a1", "v1", "a2", "v2")  # the order AVMoEBackbone._paired_block returns router weights in


def module_names(backbone: Any) -> list[str]:
    """Names of the MoE modules in the order of ``BackboneOutput.router_weights``."""
    adapters = getattr(backbone, "adapters", None) or {}
    return [f"{s}.{k}.{side}" for s in sorted(adapters, key=int) for k in range(len(adapters[s])) for side in SIDES]


def expert_names(num_cross: int, num_uni: int) -> list[str]:
    return [f"cross{i}" for i in range(num_cross)] + [f"uni{i}" for i in range(num_uni)]


def router_statistics(router_weights: list[Tensor], frames: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Sums over frames of one batch, on the device: ``weight`` (L, E) router weights, ``top1`` (L, E) argmax
    counts and ``frames`` (number of frames counted).

    ``router_weights``: L tensors (M, E) (``BackboneOutput.router_weights``); ``frames``: optional (M,) bool
    selecting the frames to count (e.g. one task's samples of a multitask batch); None counts all.
    """
    w = torch.stack([r.detach().float() for r in router_weights])  # (L, M, E)
    if frames is not None:
        w = w[:, frames.to(w.device)]
    top1 = torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).sum(1).float()  # (L, E)
    return {"weight": w.sum(1), "top1": top1, "frames": w.new_tensor(float(w.shape[1]))}


def usage_from_sums(sums: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Means from accumulated :func:`router_statistics`: ``weight`` and ``top1`` (L, E) arrays in [0, 1]."""
    n = max(float(sums["frames"]), 1.0)
    return {"weight": (sums["weight"] / n).cpu().numpy(), "top1": (sums["top1"] / n).cpu().numpy(),
            "frames": int(float(sums["frames"]))}


def heatmap(values: np.ndarray, rows: list[str], cols: list[str], title: str = "") -> np.ndarray:
    """A labelled module x expert heat map as an (H, W, 3) uint8 image (values in [0, 1], dark = 0, bright = 1)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - only when an image is drawn

    cell_w, cell_h, left, top = 56, 16, 8 + 7 * max([len(r) for r in rows] + [4]), 34
    img = Image.new("RGB", (left + cell_w * len(cols) + 8, top + cell_h * len(rows) + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title, fill="black")
    for j, col in enumerate(cols):
        draw.text((left + j * cell_w + 4, top - 14), col, fill="black")
    for i, row in enumerate(rows):
        draw.text((4, top + i * cell_h + 2), row, fill="black")
        for j in range(len(cols)):
            v = float(np.clip(values[i, j], 0.0, 1.0))
            colour = (int(255 * v), int(90 + 60 * v), int(200 * (1 - v)) + 40)  # blue (0) -> orange (1)
            box = (left + j * cell_w, top + i * cell_h, left + (j + 1) * cell_w - 1, top + (i + 1) * cell_h - 1)
            draw.rectangle(box, fill=colour)
            draw.text((box[0] + 10, box[1] + 2), f"{v:.2f}", fill="white" if v < 0.6 else "black")
    return np.asarray(img)


class RouterUsage(Callback):
    """Per-epoch router weight / argmax share of every MoE module and expert (train and validation).

    Args:
        dirpath: folder for ``<split>.json`` and the latest ``<split>.png`` heat map (the CLI sets
            ``<run folder>/router_usage``); None writes no files.
        log_scalars: log ``router/<module>/e<k>_{weight,top1>`` (train: ``router/``, validation: ``val_router/``).
        image_every_n_epochs: TensorBoard heat map period (0: never).
    """

    def __init__(self, dirpath: Optional[str] = None, log_scalars: bool = True, image_every_n_epochs: int = 1) -> None:
        self.dirpath = Path(dirpath) if dirpath else None
        self.log_scalars = log_scalars
        self.image_every_n_epochs = image_every_n_epochs
        self._sums: dict[str, dict[str, Tensor]] = {}
        self._handle: Any = None
        self._split: Optional[str] = None  # what the forward hook accumulates into ("train", "val", None)
        self._paused: Optional[str] = None
        self._module: Any = None
        self._epoch: Optional[int] = None  # the training epoch the train sums belong to
        self._restored_epoch: Optional[int] = None  # epoch of the sums restored from a checkpoint

    # -- accumulation (device only) -------------------------------------------------------------------
    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        weights = getattr(output, "router_weights", None)
        if self._split is None or not weights:
            return
        if self._split == "train" and not (torch.is_grad_enabled() and self._module.training):
            # Not a training step: an eval-mode side pass inside the training epoch (a figure's fixed batch after
            # validation, a callback's feature or valuation pass) would skew the usage of the optimised steps.
            return
        stats = router_statistics(weights)
        task = getattr(self._module, "current_task", None)  # a multitask module: usage is split by task
        key = self._split if task is None else f"{self._split}_{task}"
        acc = self._sums.get(key)
        self._sums[key] = stats if acc is None else {k: acc[k].to(stats[k].device) + stats[k] for k in acc}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        self._module = pl_module
        if backbone is not None and self._handle is None:
            self._handle = backbone.register_forward_hook(self._hook)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._split = "train"
        self._epoch = trainer.current_epoch
        if self._restored_epoch == trainer.current_epoch:  # resumed mid-epoch: keep the sums of its first part
            self._restored_epoch = None
            return
        self._restored_epoch = None
        for key in [k for k in self._sums if k == "train" or k.startswith("train_")]:
            del self._sums[key]

    # -- checkpointed, so a mid-epoch resume publishes the whole epoch as an uninterrupted run does --------------
    def state_dict(self) -> dict[str, Any]:
        # One process only: a checkpoint holds rank 0's state, and restoring rank 0's sums on every rank would count
        # them once per rank. Under DDP the interrupted epoch's train usage covers the steps after the resume.
        world = self._module.trainer.world_size if self._module is not None and self._module._trainer else 1
        train = {k: {kk: vv.detach().cpu() for kk, vv in v.items()} for k, v in self._sums.items()
                 if world == 1 and (k == "train" or k.startswith("train_"))}
        return {"epoch": self._epoch, "train_sums": train}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state only for fit, and a mid-epoch resume does not call
        # on_train_epoch_start again: the restored epoch goes on accumulating into its train sums.
        restored = {k: dict(v) for k, v in state_dict.get("train_sums", {}).items()}
        self._epoch = state_dict.get("epoch")
        if restored:  # one process, interrupted mid-epoch (see state_dict)
            self._sums.update(restored)
            self._restored_epoch = self._epoch
            self._split = "train"

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._paused = self._split  # validation inside a training epoch: training resumes after it
        self._split = None if trainer.sanity_checking else "val"
        for key in [k for k in self._sums if k == "val" or k.startswith("val_")]:
            del self._sums[key]

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._split == "val":
            self._publish(trainer, pl_module, "val")
        self._split = self._paused

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._publish(trainer, pl_module, "train")
        self._split = None

    # -- once per epoch -------------------------------------------------------------------------------
    def _publish(self, trainer: Any, pl_module: Any, split: str) -> None:
        """Every key of ``split``: the split itself, or ``<split>_<task>`` per task of a multitask module (sorted,
        so every rank reduces the same keys in the same order: all ranks run the same tasks)."""
        for key in sorted(k for k in self._sums if k == split or k.startswith(f"{split}_")):
            self._publish_key(trainer, pl_module, split, key)

    def _publish_key(self, trainer: Any, pl_module: Any, split: str, key: str) -> None:
        sums = self._sums.pop(key)
        task = key[len(split) + 1:] if key != split else None
        sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}  # one collective / key
        usage = usage_from_sums(sums)
        cfg = pl_module.backbone.config.adapter
        modules = module_names(pl_module.backbone)
        experts = expert_names(cfg.num_cross_experts, cfg.num_uni_experts)
        if len(modules) != usage["weight"].shape[0]:  # an unexpected backbone: number them
            modules = [str(i) for i in range(usage["weight"].shape[0])]
        if self.log_scalars:
            prefix = ("router" if split == "train" else "val_router") + (f"/{task}" if task else "")
            values = {f"{prefix}/{m}/e{e}_{kind}": float(usage[kind][i, e]) for kind in ("weight", "top1")
                      for i, m in enumerate(modules) for e in range(len(experts))}
            pl_module.log_dict(values, on_epoch=True, on_step=False, sync_dist=False, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        image = None
        if self.image_every_n_epochs and epoch % self.image_every_n_epochs == 0:
            image = heatmap(usage["weight"], modules, experts,
                            f"{key.replace('_', ' ')} epoch {epoch}: mean router weight")
            for logger in trainer.loggers:
                add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
                if callable(add_image) and type(logger).__name__ == "TensorBoardLogger":
                    add_image(f"router/{key}_weight", image, global_step=trainer.global_step, dataformats="HWC")
        if self.dirpath is not None:
            self._write(key, epoch, trainer.global_step, modules, experts, usage, image)

    def _write(self, split: str, epoch: int, step: int, modules: list[str], experts: list[str],
               usage: dict[str, np.ndarray], image: Optional[np.ndarray]) -> None:
        path = self.dirpath / f"{split}.json"
        history = json.loads(path.read_text())["epochs"] if path.is_file() else []
        history = [h for h in history if h["epoch"] != epoch]  # a resumed epoch replaces its earlier record
        history.append({"epoch": epoch, "global_step": step, "frames": usage["frames"],
                        "weight": usage["weight"].round(4).tolist(),
                        "top1": usage["top1"].round(4).tolist()})
        write_json_atomic(path, {"modules": modules, "experts": experts, "epochs": history}, indent=1)
        if image is not None:
            from PIL import Image  # noqa: PLC0415

            Image.fromarray(image).save(self.dirpath / f"{split}.png")
