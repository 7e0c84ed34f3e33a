"""The GEMMs of the fast path on a CPU: oneDNN's fp32 matmul instead of torch's BLAS default, where it is the same.

On a CPU torch's fp32 ``F.linear`` / ``torch.mm`` call MKL's ``sgemm``. oneDNN (shipped inside torch) computes the
same fp32 product, with no reduced precision, and on the benchmark machine (2-core AMD EPYC, AVX-512) it ran
every frozen encoder product as fast or faster, up to 1.6x, forward and input gradient (``bench/gemm_kernels.py``,
table in bench/BENCHMARKS.md). torch
reaches oneDNN's linear only through the operator its own compiler emits for frozen CPU weights,
``torch.ops.mkldnn._linear_pointwise`` (listed, with the reason, in :mod:`avmoe._private_api`).

oneDNN is taken only where it computes what the plain call would: a CPU, fp32 operands, no CPU autocast (which
would make the product bf16), outside ``torch.compile`` (which picks its own kernels), oneDNN built and not
switched off (``torch.backends.mkldnn.flags(enabled=False)``), and no gradient wanted for the weight. With a
gradient for the input only (frozen weights in training), backward is ``grad @ W`` through the same kernel.
Anything else is the plain call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from avmoe._private_api import is_exact_gelu, onednn_linear

Linear = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def onednn_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``frozen_linear(x, weight, bias)`` runs through oneDNN (else it is ``F.linear``)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == x.dtype) and not _wants_grad(weight, bias)
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
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if _wants_grad(x):
        return _FrozenLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)  # no graph to record: skip the autograd.Function's bookkeeping


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.mm(a, b)``, through oneDNN where no gradient is wanted and a's rows are contiguous (oneDNN ran a
    transposed ``a`` about 2x slower than the BLAS on the benchmark machine). a (M, K), b (K, N)."""
    if a.stride(-1) == 1 and not _wants_grad(a) and onednn_applies(a, b, None):
        return onednn_linear(a, b.t(), None)
    return torch.mm(a, b)


def choose(onednn: bool) -> Linear:
    """The linear the fast path's frozen GEMMs use: :func:`frozen_linear` or plain ``F.linear``."""
    return frozen_linear if onednn else F.linear


def mlp(layer: Any, x: Tensor, linear: Linear) -> Tensor:
    """``layer.output(layer.intermediate(x))`` of a Swin-V2 or HTS-AT block with both GEMMs through ``linear``:
    dense -> activation -> dense -> dropout, as ``Swinv2Intermediate`` / ``Swinv2Output`` and their Clap twins
    (members listed in ``avmoe._private_api.MLP_MEMBERS``). With :func:`frozen_linear` and no gradient wanted, an
    exact GELU runs inside the first GEMM (oneDNN post-op). x: (M, N, C) -> (M, N, C)."""
    inner, outer = layer.intermediate, layer.output
    act, weight, bias = inner.intermediate_act_fn, inner.dense.weight, inner.dense.bias
    if linear is frozen_linear and not _wants_grad(x) and onednn_applies(x, weight, bias) and is_exact_gelu(act):
        hidden = onednn_linear(x, weight, bias, gelu=True)  # (M, N, 4C)
    else:
        hidden = act(linear(x, weight, bias))  # (M, N, 4C)
    return outer.dropout(linear(hidden, outer.dense.weight, outer.dense.bias))
