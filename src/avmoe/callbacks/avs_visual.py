"""Predicted AVS masks drawn over the frames, logged to TensorBoard during validation."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

PRED_COLOUR = (255.0, 80.0, 0.0)  # orange fill: predicted foreground (sigmoid > 0.5)
GT_COLOUR = (255.0, 255.0, 255.0)  # white outline: ground truth (annotated frames only)


def mask_outline(mask: Tensor, width: int = 1) -> Tensor:
    """(T, S, S) bool -> the pixels of ``mask`` within ``width`` pixels of the background (erosion), bool."""
    m = mask.float().unsqueeze(1)
    eroded = -F.max_pool2d(-m, kernel_size=2 * width + 1, stride=1, padding=width)
    return (m - eroded).squeeze(1) > 0


def draw_masks(video: Tensor, pred: Tensor, target: Tensor, valid: Tensor, alpha: float = 0.45) -> Tensor:
    """One clip as a row of frames with the predicted mask filled and the ground truth outlined.

    Args:
        video: (T, 3, H, W) uint8 frames (resized to the mask size when they differ).
        pred: (T, S, S) bool predicted foreground.
        target: (T, S, S) ground truth {0, 1}.
        valid: (T,) bool: frames whose ground truth is annotated (others get no outline).
        alpha: opacity of the prediction fill.

    Returns:
        (3, S, T * S) uint8.
    """
    size = pred.shape[-2:]
    frames = video.float()
    if frames.shape[-2:] != size:
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    fill = torch.tensor(PRED_COLOUR, device=frames.device).view(1, 3, 1, 1)
    p = pred.unsqueeze(1).to(frames.dtype)  # (T, 1, S, S)
    frames = frames * (1 - alpha * p) + fill * alpha * p
    width = max(1, size[-1] // 112)  # 2 px at 224
    outline = (mask_outline(target > 0.5, width) & valid.view(-1, 1, 1)).unsqueeze(1)  # (T, 1, S, S)
    line = torch.tensor(GT_COLOUR, device=frames.device).view(1, 3, 1, 1)
    frames = torch.where(outline, line, frames)
    row = frames.clamp(0, 255).round().to(torch.uint8)  # (T, 3, S, S)
    return torch.cat(list(row), dim=-1)  # (3, S, T * S)


class AVSMaskImages(Callback):
    """Log the first ``num_clips`` validation clips with their predicted masks (rank 0, TensorBoard only).

    Each validation epoch (every ``every_n_epochs``), the clips of the first validation batches are drawn as
    one image, a row of frames per clip: prediction (``sigmoid > 0.5``) filled in orange, ground truth outlined
    in white, under the tag ``tag`` at the current global step. Needs the task's ``validation_step`` to return
    its outputs with ``logits`` (B, T, S, S), as :class:`~avmoe.tasks.avs.AVSTask` does. Sanity-check runs are
    not logged.

    Args:
        num_clips: clips per image.
        every_n_epochs: log every n-th validation epoch.
        alpha: opacity of the prediction fill.
        tag: TensorBoard image tag.
    """

    def __init__(self, num_clips: int = 4, every_n_epochs: int = 1, alpha: float = 0.45,
                 tag: str = "val/masks") -> None:
        if num_clips < 1 or every_n_epochs < 1:
            raise ValueError("num_clips and every_n_epochs must be >= 1")
        self.num_clips = num_clips
        self.every_n_epochs = every_n_epochs
        self.alpha = alpha
        self.tag = tag
        self._rows: list[Tensor] = []

    def _active(self, trainer: Any) -> bool:
        return (trainer.is_global_zero and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0 and bool(self._loggers(trainer)))

    @staticmethod
    def _loggers(trainer: Any) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._rows = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Optional[dict[str, Tensor]],
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if len(self._rows) >= self.num_clips or not self._active(trainer):
            return
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        pred = torch.sigmoid(outputs["logits"].float()) > 0.5  # (B, T, S, S)
        take = min(self.num_clips - len(self._rows), pred.shape[0])
        for i in range(take):
            row = draw_masks(batch["video"][i], pred[i], batch["mask"][i, :, 0], batch["mask_valid"][i].bool(),
                             self.alpha)
            self._rows.append(row.cpu())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._rows or not self._active(trainer):
            return
        image = torch.cat(self._rows, dim=1)  # (3, clips * S, T * S)
        for logger in self._loggers(trainer):
            logger.experiment.add_image(self.tag, image, global_step=trainer.global_step, dataformats="CHW")
        self._rows = []
