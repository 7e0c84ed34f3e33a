"""Time the frozen-weight GEMM kernel choice on a CPU: torch's default BLAS (MKL ``sgemm``) vs oneDNN.

Kernel level, fp32, at the frozen encoders' linear products of the paper-scale configuration (Swin-V2-L/12 @192
and HTS-AT, every stage: fused q/k/v, output projection, MLP in and out), M = frames x tokens (default 10
frames = one AVE clip). ``forward`` = ``x W^T + b``; ``backward`` = the input gradient ``g W``, the only backward
product of a frozen weight. ``blas`` = ``F.linear`` / ``torch.mm``; ``onednn`` = what
:func:`avmoe.models.backbones.gemm.frozen_linear` runs (``avmoe._private_api.onednn_linear``, backward with the
strided ``W^T``). Stepped in turn ``--rounds`` times after one warm-up; GFLOP/s of the medians are printed.

    OMP_NUM_THREADS=2 python bench/gemm_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avmoe._private_api import onednn_linear  # noqa: E402
from avmoe.models.config import AVMoEConfig  # noqa: E402
from bench.timing import kernel_parser, medians  # noqa: E402

KERNELS = ("blas forward", "onednn forward", "blas backward", "onednn backward")


def products(cfg: AVMoEConfig, frames: int) -> list[tuple[str, int, str, int, int, int]]:
    """(encoder, stage, product, M, K, N) of every frozen linear of both encoders' blocks."""
    out = []
    for name, enc, grid in (("swin", cfg.visual, cfg.visual.image_size // cfg.visual.patch_size),
                            ("htsat", cfg.audio, cfg.audio.spec_size // cfg.audio.patch_size)):
        width = enc.embed_dim if name == "swin" else enc.hidden_size
        for s in range(len(enc.depths)):
            m, c = frames * grid * grid, width * 2**s
            out += [(name, s, "q/k/v", m, c, 3 * c), (name, s, "proj", m, c, c),
                    (name, s, "mlp in", m, c, 4 * c), (name, s, "mlp out", m, 4 * c, c)]
            grid = (grid + 1) // 2
    return out


def runners(m: int, k: int, n: int) -> dict[str, Callable[[], None]]:
    x, w, b, g = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    return {"blas forward": lambda: F.linear(x, w, b), "onednn forward": lambda: onednn_linear(x, w, b),
            "blas backward": lambda: torch.mm(g, w), "onednn backward": lambda: onednn_linear(g, w.t(), None)}


def table(frames: int, rounds: int) -> str:
    lines = ["| encoder | stage | product | M x K x N | BLAS fwd | oneDNN fwd | BLAS bwd | oneDNN bwd | "
             "oneDNN / BLAS fwd, bwd |", "|---|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for enc, stage, name, m, k, n in products(AVMoEConfig(), frames):
            med = medians(runners(m, k, n), rounds)
            rate = {kind: 2 * m * k * n / med[kind] / 1e9 for kind in KERNELS}  # GFLOP/s
            lines.append(f"| {enc} | {stage} | {name} | {m} x {k} x {n} | "
                         + " | ".join(f"{rate[kind]:.0f}" for kind in KERNELS)
                         + f" | {rate['onednn forward'] / rate['blas forward']:.2f}x, "
                           f"{rate['onednn backward'] / rate['blas backward']:.2f}x |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = kernel_parser(__doc__).parse_args(argv)
    torch.manual_seed(0)
    return table(args.frames, args.rounds)


if __name__ == "__main__":
    main()
