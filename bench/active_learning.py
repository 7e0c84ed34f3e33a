"""Cold-start selection strategies on a synthetic audio-visual pool: accuracy of a model trained on each selection.

The pool is feature-level (``avmoe.select.synthetic.synthetic_pool``), not decoded clips: each clip has a class,
visual and audio features from class-dependent latents, a fixed per-modality offset (the controlled modality gap,
``--gap``) and a fraction ``--mismatch`` of pairs whose sound comes from another class (off-screen sound); the class
frequencies decay (``--imbalance``) so that coverage of the rare classes matters. A held-out test set comes from
the same generator. For every strategy, budget and seed, the same recipe (a linear classifier on the
concatenated standardised features, full-batch Adam, fixed epochs) is trained on the selected, labelled samples
and scored on the test set. MMCSAL runs its stage 1 on the pool (the gap before / after is reported, with and
without prototypes) and its stage 2 on the stage-1 embeddings; the baselines see the concatenated frozen features.

    python bench/active_learning.py                     # the BENCHMARKS.md table
    python bench/active_learning.py --seeds 0 --no-write  # smoke run

Writes the section ``## Cold-start selection`` of ``bench/BENCHMARKS.md`` (mean +- std over seeds), keeping its
hand-written ``**Reading**`` paragraph (revise it after a rerun). About 40 s on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from avmoe.select.mmcsal import Stage2Config
from avmoe.select.stage1 import Stage1Config, embed, modality_gap, train_stage1
from avmoe.select.strategies import select_order
from avmoe.select.synthetic import synthetic_pool

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import replace_section  # noqa: E402

SECTION = "## Cold-start selection"
VARIANTS = ["random", "kmeans", "kcenter", "typiclust", "probcover", "mmcsal", "mmcsal_no_proto", "mmcsal_no_align"]


def train_and_score(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, classes: int,
                    seed: int, epochs: int = 200) -> float:
    """The fixed recipe: a linear softmax classifier, Adam 1e-2, full batch, weight decay 1e-3."""
    torch.manual_seed(seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    a = torch.as_tensor((x_tr - mean) / std, dtype=torch.float32)
    b = torch.as_tensor((x_te - mean) / std, dtype=torch.float32)
    model = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    target = torch.as_tensor(y_tr)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(a), target).backward()
        opt.step()
    with torch.no_grad():
        return float((model(b).argmax(1).numpy() == y_te).mean())


def run(args: argparse.Namespace) -> dict:
    results: dict = {"acc": {}, "gap": []}
    stage1 = Stage1Config(epochs=args.stage1_epochs, num_prototypes=args.classes, dim=32, hidden=128, batch_size=256)
    for seed in args.seeds:
        data = synthetic_pool(args.pool + args.test, num_classes=args.classes, gap=args.gap,
                              mismatch_rate=args.mismatch, imbalance=args.imbalance, seed=seed)
        pool = slice(0, args.pool)
        test = slice(args.pool, None)
        a, v, y = data.audio[pool], data.visual[pool], data.labels[pool]
        x_all = np.concatenate([data.audio, data.visual], 1)
        log: list[dict] = []
        heads = train_stage1(a, v, stage1, seed=seed, log=log)
        za, zv = embed(heads, a, v)
        heads0 = train_stage1(a, v, dataclasses.replace(stage1, proto_weight=0.0), seed=seed)
        za0, zv0 = embed(heads0, a, v)
        results["gap"].append({"seed": seed, "before": log[0]["gap"], "after": modality_gap(za, zv),
                               "after_no_proto": modality_gap(za0, zv0)})
        for variant in args.variants:
            t = time.perf_counter()
            if variant.startswith("mmcsal"):
                feats = (za0, zv0) if variant == "mmcsal_no_proto" else (za, zv)
                stage2 = Stage2Config(alignment_weight=0.0) if variant == "mmcsal_no_align" else Stage2Config()
                order = select_order("mmcsal", *feats, args.budgets, seed, stage2=stage2)
            else:
                order = select_order(variant, a, v, args.budgets, seed)
            for budget in args.budgets:
                chosen = order[:budget]
                acc = train_and_score(x_all[pool][chosen], y[chosen], x_all[test], data.labels[test], args.classes, seed)
                results["acc"].setdefault((variant, budget), []).append(
                    {"acc": acc, "mismatched": float(data.mismatched[pool][chosen].mean()),
                     "classes": len(set(y[chosen].tolist()))})
            print(f"seed {seed} {variant:16s} {time.perf_counter() - t:5.1f} s  "
                  + "  ".join(f"B={b}: {results['acc'][(variant, b)][-1]['acc']:.3f}" for b in args.budgets), flush=True)
    return results


def fmt(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"


def table(args: argparse.Namespace, results: dict) -> str:
    lines = [SECTION, "",
             f"`python bench/active_learning.py` — pool {args.pool}, test {args.test}, {args.classes} classes "
             f"(imbalance {args.imbalance}), gap offset {args.gap}, mismatched pairs {args.mismatch:.0%}, "
             f"seeds {args.seeds}; linear classifier on the selected samples; test accuracy %, mean ± std over seeds "
             f"(in brackets: % of off-screen-sound pairs selected / classes covered, means).", "",
             "| strategy | " + " | ".join(f"B = {b}" for b in args.budgets) + " |",
             "|---|" + "---|" * len(args.budgets)]
    for variant in args.variants:
        cells = []
        for b in args.budgets:
            rows = results["acc"][(variant, b)]
            mism = statistics.mean(r["mismatched"] for r in rows) * 100
            cov = statistics.mean(r["classes"] for r in rows)
            cells.append(f"{fmt([r['acc'] for r in rows])} ({mism:.0f} / {cov:.1f})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    g = results["gap"]
    lines += ["", "Modality gap (distance between the centroids of the normalised stage-1 embeddings): "
              f"before stage 1 {fmt([r['before'] for r in g], False)}, after stage 1 with prototypes "
              f"{fmt([r['after'] for r in g], False)}, without prototypes {fmt([r['after_no_proto'] for r in g], False)}.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--gap", type=float, default=3.0)
    p.add_argument("--mismatch", type=float, default=0.3)
    p.add_argument("--imbalance", type=float, default=0.25)
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--stage1-epochs", type=int, default=30)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args)
    text = table(args, results)
    print(text)
    if not args.no_write:
        replace_section(SECTION, text, keep_from="**Reading")
    return results


if __name__ == "__main__":
    main()
