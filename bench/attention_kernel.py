"""Time the window-attention kernel choice: torch's fused SDPA kernel vs two GEMMs around fp32 scores.

Kernel level, forward + backward (q, k, v require grad; an additive 4-D mask as the fast path caches it), at the
window shapes of the paper-scale encoders (Swin-V2-L/12 @192 and HTS-AT: every stage, the unshifted layout
(M * windows, heads, L, d)), M frames (default 10 = one AVE clip), in fp32 and bf16. ``fused`` =
``F.scaled_dot_product_attention`` (on a CPU with a 4-D mask: its flash kernel), ``gemm`` =
:func:`avmoe.models.backbones.windows.gemm_attention`. The two are stepped in turn ``--rounds`` times after one
warm-up; medians and their ratio are printed. :func:`~avmoe.models.backbones.windows.window_softmax_attention`
takes ``fused`` for fp32 and on GPUs and ``gemm`` for bf16/fp16 on a CPU, from this table.

    OMP_NUM_THREADS=2 python bench/attention_kernel.py
    python bench/attention_kernel.py --section     # also write the BENCHMARKS.md section
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avmoe.models.backbones.windows import gemm_attention  # noqa: E402
from avmoe.models.config import AVMoEConfig  # noqa: E402
from bench.timing import kernel_parser, medians  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def window_shapes(cfg: AVMoEConfig, frames: int) -> list[tuple[str, int, int, int, int, int]]:
    """(encoder, stage, batch = frames * windows, heads, L, d) of every stage of both encoders."""
    out = []
    for name, enc, grid0 in (("swin", cfg.visual, cfg.visual.image_size // cfg.visual.patch_size),
                             ("htsat", cfg.audio, cfg.audio.spec_size // cfg.audio.patch_size)):
        width = enc.embed_dim if name == "swin" else enc.hidden_size
        grid = grid0
        for s, heads in enumerate(enc.num_heads):
            win = min(enc.window_size, grid)  # the libraries clamp the window to a smaller grid
            windows = (-(-grid // win)) ** 2
            out.append((name, s, frames * windows, heads, win * win, (width * 2**s) // heads))
            grid = (grid + 1) // 2
    return out


def runner(kind: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Callable[[], None]:
    batch, heads, length, d = shape
    q, k, v = (torch.randn(batch, heads, length, d, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, heads, length, length, dtype=dtype if kind == "fused" else torch.float32)
    grad = torch.randn(batch, heads, length, d, dtype=dtype)

    def run() -> None:
        if kind == "fused":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        else:
            out = gemm_attention(q, k, v, mask, 0.0, d**-0.5)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
    return run


def table(frames: int, rounds: int) -> str:
    lines = ["| encoder | stage | windows x heads, L, d | dtype | fused ms | gemm ms | fused / gemm |",
             "|---|---|---|---|---|---|---|"]
    for enc, stage, batch, heads, length, d in window_shapes(AVMoEConfig(), frames):
        for label, dtype in DTYPES.items():
            shape = (batch, heads, length, d)
            med = medians({k: runner(k, shape, dtype) for k in ("fused", "gemm")}, rounds)
            lines.append(f"| {enc} | {stage} | {batch} x {heads}, {length}, {d} | {label} | {1e3 * med['fused']:.1f} "
                         f"| {1e3 * med['gemm']:.1f} | {med['fused'] / med['gemm']:.2f}x |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = kernel_parser(__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--section", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = table(args.frames, args.rounds)
    if args.section:
        from bench.report import replace_section

        replace_section("## Window attention kernel", "## Window attention kernel\n\n"
                        f"`python bench/attention_kernel.py --frames {args.frames} --rounds {args.rounds}` "
                        f"({torch.get_num_threads()} threads, torch {torch.__version__}).\n\n{text}\n",
                        keep_from="**Reading")
    return text


if __name__ == "__main__":
    main()
