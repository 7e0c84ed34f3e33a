"""The GEMM of a frozen encoder weight on a CPU: oneDNN's fp32 matmul instead of torch's BLAS default.

On a CPU torch's fp32 ``F.linear`` calls MKL's ``sgemm``. oneDNN (shipped inside torch) computes the same fp32
product, with no reduced precision, and on the benchmark machine (2-core AMD EPYC, AVX-512) it ran the frozen
encoders' products 8-26 % faster (M = 720-11520 tokens, K and N = 768-12288; bench/BENCHMARKS.md). torch reaches
oneDNN's linear only through the operator its own compiler emits for frozen CPU weights,
``torch.ops.mkldnn._linear_pointwise`` (listed, with the reason, in :mod:`avmoe._private_api`).

:func:`frozen_linear` takes that kernel only where it computes what ``F.linear`` would: a CPU, fp32 operands,
no CPU autocast (which would make ``F.linear`` a bf16 product), weight and bias not requiring grad (so the only
gradient is the input's, ``grad @ W``, through the same kernel), outside ``torch.compile`` (which picks its own
kernels), oneDNN built and not switched off (``torch.backends.mkldnn.flags(enabled=False)``). Anything else is
plain ``F.linear``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from avmoe._private_api import onednn_linear

Linear = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def onednn_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``frozen_linear(x, weight, bias)`` runs through oneDNN (else it is ``F.linear``)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not weight.requires_grad and (bias is None or (not bias.requires_grad and bias.dtype == x.dtype))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class _FrozenLinear(torch.autograd.Function):
    """``x @ W.T + b`` with W, b frozen: backward returns the input gradient only, ``grad @ W``."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return onednn_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
        ctx.save_for_backward(inputs[1])  # the weight only: x is not needed for the input gradient

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None, None]:  # noqa: ANN001
        (weight,) = ctx.saved_tensors
        grad_x = onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # (..., K)
        return grad_x, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`onednn_applies`. x (..., K), weight (N, K)."""
    if onednn_applies(x, weight, bias):
        return _FrozenLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def choose(onednn: bool) -> Linear:
    """The linear the fast path's frozen GEMMs use: :func:`frozen_linear` or plain ``F.linear``."""
    return frozen_linear if onednn else F.linear


def mlp(layer: Any, x: Tensor, linear: Linear) -> Tensor:
    """``layer.output(layer.intermediate(x))`` of a Swin-V2 or HTS-AT block with both GEMMs through ``linear``:
    dense -> activation -> dense -> dropout, as ``Swinv2Intermediate`` / ``Swinv2Output`` and their Clap twins
    (members listed in ``avmoe._private_api.MLP_MEMBERS``). x: (M, N, C) -> (M, N, C)."""
    inner, outer = layer.intermediate, layer.output
    hidden = inner.intermediate_act_fn(linear(x, inner.dense.weight, inner.dense.bias))  # (M, N, 4C)
    return outer.dropout(linear(hidden, outer.dense.weight, outer.dense.bias))
