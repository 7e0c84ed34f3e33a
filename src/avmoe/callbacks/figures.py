"""The paper's qualitative figures as outputs of a run: AVVP timelines, AVE segments, feature embeddings.

Each callback draws a few *fixed* validation clips (the first ``num_videos`` of the split, so epochs are
comparable) at the end of validation into TensorBoard images, and at test time also writes PNGs into
``<run folder>/figures/``. They work on a single-task module and on a :class:`~avmoe.tasks.MultitaskModule`
(``task`` names the member; default: the one of the right class). Rank zero only; sanity checks are skipped.
Images are drawn with numpy and Pillow only (no plotting library).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw
from torch import Tensor

from avmoe.datamodules.ave import AVE_CATEGORIES
from avmoe.datamodules.batch import collate
from avmoe.datamodules.llp import LLP_CATEGORIES
from avmoe.metrics.avvp import avvp_predictions

CELL = 18  # pixels per segment cell
LABEL_W = 150  # pixels of the row-label column
COLOURS = {"gt_audio": (40, 120, 220), "pred_audio": (130, 190, 255), "gt_visual": (220, 90, 30),
           "pred_visual": (255, 180, 120), "correct": (60, 170, 60), "wrong": (210, 50, 50)}


def _tensorboards(trainer: Any) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _member(pl_module: Any, trainer: Any, cls_name: str, task: Optional[str]) -> tuple[Any, Any, Optional[str]]:
    """(task module, its DataModule, member name or None) for a single-task or multitask module."""
    members = getattr(pl_module, "tasks", None)
    if members is None:
        return pl_module, trainer.datamodule, None
    names = [task] if task else [n for n, t in members.items() if type(t).__name__ == cls_name]
    if len(names) != 1 or names[0] not in members:
        raise ValueError(f"figures: name the member task (task=...); candidates {names} of {list(members)}")
    return members[names[0]], trainer.datamodule.tasks[names[0]], names[0]


@torch.no_grad()
def fixed_batch(pl_module: Any, trainer: Any, cls_name: str, task: Optional[str], num: int,
                split: str = "val") -> tuple[Any, dict[str, Any], dict[str, Tensor]]:
    """The first ``num`` clips of ``split``, run through the model in eval mode: (task module, batch, outputs)."""
    module, dm, name = _member(pl_module, trainer, cls_name, task)
    dataset = dm.dataset(split)
    batch = collate([dataset[i] for i in range(min(num, len(dataset)))])
    batch.pop("skipped", None)
    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
    if name is not None:
        batch["task"] = name
    was_training = pl_module.training
    pl_module.eval()
    _, outputs = pl_module(batch)
    pl_module.train(was_training)
    return module, batch, outputs


def _label_image(rows: list[tuple[str, np.ndarray, tuple[int, int, int]]], title: str) -> np.ndarray:
    """Rows of (label, (T,) bool cells, colour) as an HWC uint8 image with a title line."""
    steps = len(rows[0][1]) if rows else 10
    height, width = CELL * (len(rows) + 1), LABEL_W + CELL * steps
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((2, 2), title, fill=(0, 0, 0))
    for r, (label, cells, colour) in enumerate(rows, start=1):
        y = r * CELL
        draw.text((2, y + 3), label[:24], fill=(0, 0, 0))
        for t, on in enumerate(cells):
            x = LABEL_W + t * CELL
            draw.rectangle([x, y + 1, x + CELL - 2, y + CELL - 2], fill=colour if on else (235, 235, 235))
    return np.asarray(img)


def avvp_timeline(gt_audio: np.ndarray, gt_visual: np.ndarray, pred_audio: np.ndarray, pred_visual: np.ndarray,
                  names: tuple[str, ...], title: str) -> np.ndarray:
    """One video's parsing: for every class with a true or predicted event, four rows over the segments
    (true audio, predicted audio, true visual, predicted visual). Arrays (C, T) {0, 1}; returns HWC uint8."""
    rows = []
    active = np.flatnonzero((gt_audio + gt_visual + pred_audio + pred_visual).sum(-1) > 0)
    for c in active:
        rows += [(f"{names[c]} A true", gt_audio[c] > 0, COLOURS["gt_audio"]),
                 (f"{names[c]} A pred", pred_audio[c] > 0, COLOURS["pred_audio"]),
                 (f"{names[c]} V true", gt_visual[c] > 0, COLOURS["gt_visual"]),
                 (f"{names[c]} V pred", pred_visual[c] > 0, COLOURS["pred_visual"])]
    if not rows:
        rows = [("no events", np.zeros(gt_audio.shape[-1], bool), COLOURS["gt_audio"])]
    return _label_image(rows, title)


def ave_segments(frames: np.ndarray, true: np.ndarray, pred: np.ndarray, names: tuple[str, ...],
                 title: str, size: int = 64) -> np.ndarray:
    """One clip: its frames in a row, under each the true and the predicted event (green when equal, red
    otherwise). frames (T, 3, H, W) uint8, true/pred (T,) class ids; returns HWC uint8."""
    tiles = [Image.fromarray(f.transpose(1, 2, 0)).resize((size, size)) for f in frames]
    img = Image.new("RGB", (size * len(tiles), size + 44), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((2, 1), title, fill=(0, 0, 0))
    for t, tile in enumerate(tiles):
        x = t * size
        img.paste(tile, (x, 12))
        ok = int(true[t]) == int(pred[t])
        draw.rectangle([x, size + 12, x + size - 2, size + 43], fill=COLOURS["correct" if ok else "wrong"])
        draw.text((x + 2, size + 13), names[int(true[t])][:10], fill=(255, 255, 255))
        draw.text((x + 2, size + 27), names[int(pred[t])][:10], fill=(255, 255, 255))
    return np.asarray(img)


class _Figures(Callback, ABC):
    cls_name = ""
    tag = ""

    def __init__(self, num_videos: int = 3, every_n_epochs: int = 1, task: Optional[str] = None) -> None:
        if num_videos < 1 or every_n_epochs < 1:
            raise ValueError("num_videos and every_n_epochs must be >= 1")
        self.num_videos, self.every_n_epochs, self.task = num_videos, every_n_epochs, task

    @abstractmethod
    def draw(self, module: Any, batch: dict[str, Any], outputs: dict[str, Tensor]) -> list[np.ndarray]:
        """The images (H, W, 3 uint8) of one fixed batch."""

    def _emit(self, trainer: Any, pl_module: Any, split: str) -> None:
        module, batch, outputs = fixed_batch(pl_module, trainer, self.cls_name, self.task, self.num_videos, "val")
        images = self.draw(module, batch, outputs)
        for i, image in enumerate(images):
            for logger in _tensorboards(trainer):
                logger.experiment.add_image(f"{self.tag}/{i}", image, global_step=trainer.global_step,
                                            dataformats="HWC")
            if split == "test":
                folder = Path(trainer.default_root_dir) / "figures"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{self.tag.replace('/', '_')}_{i}.png")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0:
            self._emit(trainer, pl_module, "val")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._emit(trainer, pl_module, "test")


class AVVPTimelines(_Figures):
    """Predicted vs true audio and visual events per class over the 10 segments (the paper's qualitative
    parsing figure) for the first ``num_videos`` validation videos; predictions thresholded as the official
    evaluation (segment and video probability >= 0.5)."""

    cls_name, tag = "AVVPTask", "figures/avvp_timeline"

    def draw(self, module: Any, batch: dict[str, Any], outputs: dict[str, Tensor]) -> list[np.ndarray]:
        audio, visual = avvp_predictions(outputs["global_prob"], outputs["audio_seg_prob"], outputs["visual_seg_prob"])
        names = batch.get("video_id") or [str(i) for i in batch["index"].tolist()]
        return [avvp_timeline(batch["gt_audio"][i].cpu().numpy(), batch["gt_visual"][i].cpu().numpy(),
                              audio[i].cpu().numpy(), visual[i].cpu().numpy(), LLP_CATEGORIES, str(names[i]))
                for i in range(audio.shape[0])]


class AVESegments(_Figures):
    """Frames of the first ``num_videos`` validation clips with the true (top) and predicted (bottom) event of
    every 1-s segment; green where they agree."""

    cls_name, tag = "AVETask", "figures/ave_segments"

    def draw(self, module: Any, batch: dict[str, Any], outputs: dict[str, Tensor]) -> list[np.ndarray]:
        pred = module.predict_segments(outputs).cpu().numpy()
        names = (*AVE_CATEGORIES, "background")
        ids = batch.get("video_id") or [str(i) for i in batch["index"].tolist()]
        return [ave_segments(batch["video"][i].cpu().numpy(), batch["label"][i].cpu().numpy(), pred[i], names,
                             str(ids[i])) for i in range(pred.shape[0])]


def embedding_labels(module: Any, batch: dict[str, Any]) -> list[str]:
    """A class name per sample for the embedding projector (AVE clip event, AVVP weak labels, AVQA answer,
    AVS category; else the sample index)."""
    n = int(batch["index"].shape[0])
    if "label" in batch and batch["label"].dim() == 2:  # AVE (B, T)
        from avmoe.tasks.ave import video_class  # noqa: PLC0415

        cls, has = video_class(batch["label"])
        return [AVE_CATEGORIES[c] if h else "background" for c, h in zip(cls.tolist(), has.tolist())]
    if "labels" in batch:  # AVVP (B, C) weak labels
        return ["+".join(LLP_CATEGORIES[c] for c in torch.nonzero(row).flatten().tolist()) or "none"
                for row in batch["labels"]]
    if "answer" in batch and getattr(module, "answer_vocab", None):
        return module.answer_strings(batch["answer"])
    if "category" in batch:
        return [str(c) for c in batch["category"]]
    return [str(i) for i in batch["index"].tolist()][:n]


class FeatureEmbeddings(Callback):
    """Pooled audio and visual features of up to ``max_samples`` test clips, labelled by class, in the
    TensorBoard embedding projector (the paper's t-SNE figure: choose t-SNE in the projector), one embedding
    per modality (``embeddings/audio``, ``embeddings/visual``). Costs one extra backbone pass per test batch
    until ``max_samples`` are collected."""

    def __init__(self, max_samples: int = 500) -> None:
        self.max_samples = max_samples
        self._rows: dict[str, list[Tensor]] = {"audio": [], "visual": []}
        self._labels: list[str] = []

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._rows, self._labels = {"audio": [], "visual": []}, []

    @torch.no_grad()
    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if not trainer.is_global_zero or len(self._labels) >= self.max_samples or not _tensorboards(trainer):
            return
        names = getattr(pl_module, "eval_task_names", None)
        module = pl_module
        if names is not None:  # multitask: the member of this dataloader
            batch["task"] = names()[dataloader_idx]
            module = pl_module.tasks[batch["task"]]
        feats = pl_module.encode(batch)
        prefix = f"{batch['task']}:" if "task" in batch else ""
        self._rows["audio"].append(feats.audio.float().mean(1).cpu())  # (B, C)
        self._rows["visual"].append(feats.visual.float().mean(1).cpu())
        self._labels += [prefix + label for label in embedding_labels(module, batch)]

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._labels:
            return
        n = min(len(self._labels), self.max_samples)
        for modality, rows in self._rows.items():
            mat = torch.cat(rows)[:n]
            for logger in _tensorboards(trainer):
                logger.experiment.add_embedding(mat, metadata=self._labels[:n], tag=f"embeddings/{modality}",
                                                global_step=trainer.global_step)
