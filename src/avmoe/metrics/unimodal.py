"""How well each modality does alone: the mean per-sample correctness of the uni-modal predictions."""

from __future__ import annotations

import torch
from torch import Tensor

from avmoe.metrics.base import PerSampleMetric


class UnimodalCorrectness(PerSampleMetric):
    """Rows ``(index, [correct_audio, correct_visual])``; ``compute`` gives ``unimodal_audio`` and
    ``unimodal_visual``, the means over the split with every sample counted once (DDP padding removed)."""

    def update(self, index: Tensor, audio: Tensor, visual: Tensor) -> None:  # (B,), (B,), (B,)
        super().update(index, torch.stack([audio.float().view(-1), visual.float().view(-1)], dim=1))

    def compute(self) -> dict[str, Tensor]:
        _, values = self.rows()
        if values.numel() == 0:
            nan = torch.tensor(float("nan"))
            return {"unimodal_audio": nan, "unimodal_visual": nan}
        means = values.mean(0)
        return {"unimodal_audio": means[0], "unimodal_visual": means[1]}
