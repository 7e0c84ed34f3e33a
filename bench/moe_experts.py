"""Time one MoE adapter forward + backward at paper-scale shapes: experts one by one vs batched vs factored.

Module level (no encoders): one :class:`~avmoe.models.moe.MoEAdapter` with a paper config's adapter settings, at
the token counts and widths of the paper-scale model (Swin-V2-L/12 @192 + HTS-AT tiny, the same for every task),
M frames (default 10 = one AVE clip), for each adapted stage and side (``a``: audio tokens reading the visual
stream, ``v``: the reverse). ``plain`` = :meth:`MoEAdapter.forward` (experts one by one, the reference),
``batched`` = :func:`avmoe.models.moe_batched.batched_moe_forward` with ``y`` materialised (the ``linear``
unimodal experts share one LayerNorm and one down-projection GEMM; for configs without them it is the same
computation as ``plain``), ``factored`` = the same with the automatic factored read of ``y`` (the ``backbone.fast``
default, ``models/moe_factored.py``; the same computation as ``batched`` where factoring does not pay: the
``factors`` column). All run on the same module and inputs, stepped in turn (round robin) ``--rounds`` times
after one warm-up; the median of each is reported, with the ratio of the minima (the rounds least disturbed by
other processes); the outputs and gradients are checked equal to ``plain`` first.

    OMP_NUM_THREADS=1 python bench/moe_experts.py --threads 1
    python bench/moe_experts.py --threads 2 --configs ave avqa --rounds 9   # the configs with linear experts
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avmoe.models.config import AVMoEConfig  # noqa: E402
from avmoe.models.moe import MoEAdapter  # noqa: E402
from avmoe.models.moe_batched import batched_moe_forward  # noqa: E402
from avmoe.models.moe_factored import factoring_pays  # noqa: E402
from avmoe.models.presets import PAPER_CONFIGS, paper_config  # noqa: E402
from bench.timing import round_robin  # noqa: E402


# name -> fn(module, x, other): the computations compared (``plain`` is the reference the others must equal)
COMPUTATIONS: dict[str, Callable] = {
    "plain": lambda m, a, b: m(a, b),
    "batched": partial(batched_moe_forward, factor=False),
    "factored": batched_moe_forward,
}


def paper_shapes(cfg: AVMoEConfig) -> list[tuple[int, str, int, int, int, int]]:
    """(stage, side, dim, other_dim, tokens, other_tokens) of every adapted stage, from the config's encoder sizes
    (the grids halve per stage as in :func:`avmoe.models.backbones.swin.stage_grids`)."""
    vgrid, agrid = cfg.visual.image_size // cfg.visual.patch_size, cfg.audio.spec_size // cfg.audio.patch_size
    out = []
    for s in range(len(cfg.visual.depths)):
        skip = cfg.adapter.num_skip
        if not (skip > 1 and (s + 1) % skip == 0):
            cv, ca = cfg.visual.embed_dim * 2**s, cfg.audio.hidden_size * 2**s
            nv, na = vgrid**2, agrid**2
            out += [(s, "a", ca, cv, na, nv), (s, "v", cv, ca, nv, na)]
        vgrid, agrid = (vgrid + 1) // 2, (agrid + 1) // 2
    return out


def runners(module: MoEAdapter, x: torch.Tensor, other: torch.Tensor) -> dict[str, Callable[[], None]]:
    grad = torch.randn_like(x)

    def make(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = other.grad = None
            out, weights, lb = fn(module, x, other)
            torch.autograd.backward([out, weights.sum() + lb], [grad, None])
        return run

    return {name: make(fn) for name, fn in COMPUTATIONS.items()}


def check_equal(module: MoEAdapter, x: torch.Tensor, other: torch.Tensor) -> None:
    """Outputs, router weights and every gradient of the two computations (fp32, same module, eval-mode BN)."""
    module.eval()
    results = []
    for fn in COMPUTATIONS.values():
        module.zero_grad(set_to_none=True)
        out, weights, _ = fn(module, x, other)
        out.square().mean().backward()
        results.append((out, weights, {n: p.grad.clone() for n, p in module.named_parameters()}))
    (o1, w1, g1), *others = results
    for o2, w2, g2 in others:
        torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-6)
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-3, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
    module.train()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ave", "avvp", "avs_s4", "avs_ms3", "avqa"],
                        choices=sorted(PAPER_CONFIGS))
    parser.add_argument("--frames", type=int, default=10, help="M = B*T frames (10: one AVE clip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2],
                        help="adapted stages to time (default: the AVE config's, 0 and 2)")
    parser.add_argument("--input-grad", action=argparse.BooleanOptionalAction, default=True,
                        help="backward also to x and the other modality (as after the first adapter position)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), M = {args.frames}, median of {args.rounds} rounds, "
          f"input gradients {'on' if args.input_grad else 'off'}")
    print("| config | stage | side | C | N | C' | N' | factors | plain ms | batched ms | factored ms "
          "| plain / batched | plain / factored | min: plain / factored |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.configs:
        cfg = paper_config(name)
        for stage, side, dim, odim, tokens, otokens in paper_shapes(cfg):
            if stage not in args.stages:
                continue
            torch.manual_seed(0)
            module = MoEAdapter(dim, odim, tokens, otokens, cfg.adapter, gated=True).train()
            with torch.no_grad():  # open the zero-initialised gates: every expert reaches the output
                for pname, p in module.named_parameters():
                    if pname.endswith("gate") or pname.endswith("gate_av"):
                        p.fill_(0.5)
            x, other = torch.randn(args.frames, tokens, dim), torch.randn(args.frames, otokens, odim)
            if args.input_grad:  # as at every adapter position after the first: the encoders carry gradients
                x.requires_grad_(True)
                other.requires_grad_(True)
            check_equal(module, x, other)
            fns = runners(module, x, other)
            times = round_robin(fns, args.rounds)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}  # least disturbed by other processes
            rows.append({"config": name, "stage": stage, "side": side, **med})
            print(f"| {name} | {stage} | {side} | {dim} | {tokens} | {odim} | {otokens} "
                  f"| {'yes' if factoring_pays(module) else 'no'} | {med['plain']:.1f} | {med['batched']:.1f} "
                  f"| {med['factored']:.1f} | {med['plain'] / med['batched']:.3f}x "
                  f"| {med['plain'] / med['factored']:.3f}x | {best['plain'] / best['factored']:.3f}x |", flush=True)
    return rows


if __name__ == "__main__":
    main()
