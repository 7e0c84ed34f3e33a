"""TF32 for the fp32 matrix products and convolutions of a run on CUDA (``run.tf32``, on in the GPU presets).

TensorFloat-32 keeps fp32 storage and range but multiplies with a 10-bit mantissa on the tensor cores (Ampere and
newer): fp32 training at several times the speed of IEEE fp32 products, with about bf16-autocast-level rounding
in the products only. torch's switches are process-wide (``torch.backends.cuda.matmul.allow_tf32`` for cuBLAS,
``torch.backends.cudnn.allow_tf32`` for cuDNN); this callback sets them for the run when the Trainer's device is
CUDA and restores the previous values when the run ends. On a CPU (or any other device) it changes nothing: the
switches are CUDA-only, CPU matmul precision (``torch.backends.mkldnn``) is left alone.

Under ``precision: 32-true`` every fp32 matmul of the run is affected; under ``bf16-mixed`` autocast already runs
the matmuls in bf16 and only the products autocast leaves in fp32 are.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class TF32Matmul(Callback):
    """Allow TF32 in cuBLAS matmuls and cuDNN convolutions while the run is on a CUDA device.

    Args:
        matmul: value of ``torch.backends.cuda.matmul.allow_tf32`` during the run.
        cudnn: value of ``torch.backends.cudnn.allow_tf32`` during the run.
    """

    def __init__(self, matmul: bool = True, cudnn: bool = True) -> None:
        self.matmul = matmul
        self.cudnn = cudnn
        self._previous: Optional[tuple[bool, bool]] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cuda" or self._previous is not None:
            return
        self._previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.matmul
        torch.backends.cudnn.allow_tf32 = self.cudnn

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._previous
            self._previous = None
