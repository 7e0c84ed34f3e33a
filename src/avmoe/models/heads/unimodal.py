"""Building blocks of the auxiliary uni-modal heads (``unimodal.mode: aux`` of every task).

An auxiliary head reads one modality's backbone features and predicts the task's targets on its own; each task
maps these read-outs onto its own output keys, so that its ``sample_scores`` / ``sample_correct`` and a
per-sample loss apply to them unchanged (the "separate uni-modal heads" pattern of MMPareto, GeWu-Lab/MMPareto_ICML2024 ``code/models/models.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Readout(nn.Module):
    """LayerNorm then Linear over the last dimension: (..., C) -> (..., K).

    The norm makes the read-out independent of the feature scale, which differs a lot between the encoders.
    """

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class DenseReadout(nn.Module):
    """Per-token logits on a (h, w) token grid, resized to a square mask: (B, T, h*w, C) -> (B, T, S, S)."""

    def __init__(self, dim: int, grid: tuple[int, int], mask_size: int) -> None:
        super().__init__()
        self.readout = Readout(dim, 1)
        self.grid, self.mask_size = tuple(grid), mask_size

    def forward(self, tokens: Tensor) -> Tensor:
        b, t, n, _ = tokens.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(f"DenseReadout: {n} tokens do not fill the {h}x{w} grid it was built for")
        logits = self.readout(tokens).view(b * t, 1, h, w)  # (M, 1, h, w)
        size = (self.mask_size, self.mask_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).view(b, t, *size)
