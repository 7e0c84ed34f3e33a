"""Robustness of the balancing methods and CRMT, and the AVMoE expert ablation, on synthetic AVE releases.

Part 1, methods: on the synthetic imbalanced release of ``bench/balance.py`` (same data, tiny model, recipe and
epochs: its ``make_release``, ``HEAD``, ``METHODS``), train the baseline, OGM-GE, sample-level valuation and
CRMT (stage 1: ``lightning_configs/callbacks/crmt_stage1.yaml``; stage 2 initialised from stage 1 through
``avmoe.cli.init_weights``, the ``--run.init_from`` loader, with ``crmt_stage2.yaml``'s callback and optimizer
settings) for several seeds, then evaluate every model through the project's robustness path: a Trainer with
:class:`~avmoe.callbacks.robustness.RobustEval` and ``inference_mode=False``, the clean ``test``, then
:func:`~avmoe.callbacks.robustness.run_sweep` over series taken from ``lightning_configs/robustness/sweep.yaml``
(missing audio, missing video, white noise, Gaussian blur, L2-PGD on the frames), exactly what
``lightning test --config lightning_configs/robustness/sweep.yaml`` runs after its test.

Part 2, ablation: on a synthetic AVE release (``write_ave_release``) train the full tiny AVMoE, cross-modal
experts only (``num_uni_experts: 0``) and unimodal experts only (``num_cross_experts: 0``), and test each clean
and visual-only (``lightning_configs/robustness/visual_only.yaml``: silent waveform before the log-mel).

Metric: AVE segment accuracy (``test/acc``) on the test split; relative drop ``(clean - value) / clean`` as in
``metrics/robustness.json``. Every run's tables go to ``<out>/runs/<name>/robustness*.json`` and one JSON line
per run to ``<out>/robustness_results.jsonl``; the section ``## Robustness ...`` of ``bench/BENCHMARKS.md`` is
replaced by the tables (its hand-written text from ``**Reading`` on is kept, to be revised by hand).

    python bench/robustness.py                       # the BENCHMARKS.md section (~80 min of runs, 1 thread)
    python bench/robustness.py --seeds 2 --reuse --no-write &   # seeds in parallel processes, then:
    python bench/robustness.py --table-only          # rebuild the section from the results file
    python bench/robustness.py --seeds 0 --epochs 1 --methods baseline crmt --ablation full --no-write  # smoke

``--reuse`` keeps runs already in the results file and evaluates saved weights (``<out>/runs/*/model.pt``)
instead of retraining.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balance import AUDIO, HEAD, METHODS, WEAK_CONTRAST, CachedAVEDataModule, make_release  # noqa: E402
from bench.report import replace_section  # noqa: E402
from avmoe.callbacks import CRMT  # noqa: E402
from avmoe.callbacks.robustness import RobustEval, run_sweep  # noqa: E402
from avmoe.cli import init_weights  # noqa: E402
from avmoe.datamodules import AVEDataModule  # noqa: E402
from avmoe.datamodules.synthetic.ave import write_ave_release  # noqa: E402
from avmoe.models.presets import tiny_config  # noqa: E402
from avmoe.robustness.sweep import SweepItem  # noqa: E402
from avmoe.tasks.ave import AVETask  # noqa: E402
from avmoe.tasks.base import OptimConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "lightning_configs"
SECTION = "## Robustness (missing / corrupted modalities, attacks) and CRMT"
METRIC = "test/acc"
LABELS = {"baseline": "baseline", "ogm_ge": "OGM-GE (alpha 0.8)", "valuation": "valuation (sample level)",
          "crmt": "CRMT (stage 1 + stage 2)"}
ABLATIONS = {"full": {}, "cross_only": {"num_uni_experts": 0}, "uni_only": {"num_cross_experts": 0}}
ABLATION_LABELS = {"full": "full model (1 cross-modal + 1 unimodal expert)",
                   "cross_only": "cross-modal experts only (`num_uni_experts: 0`)",
                   "uni_only": "unimodal experts only (`num_cross_experts: 0`)"}


# ------------------------------------------------------------------------------------------ configs as the CLI has them
def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def crmt_callback_args(stage: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CRMT init_args, model optim overrides) of ``lightning_configs/callbacks/crmt_stage<stage>.yaml``."""
    cfg = _yaml(CONFIGS / "callbacks" / f"crmt_stage{stage}.yaml")
    callback = next(c for c in cfg["trainer"]["callbacks+"] if c["class_path"].endswith("CRMT"))
    return dict(callback["init_args"]), dict(cfg["model"]["init_args"].get("optim") or {})


def sweep_items(severities: list[int], radii: list[float]) -> dict[str, list[SweepItem]]:
    """Series of ``robustness/sweep.yaml`` with their values cut down: ``frames`` (decoded-and-cached clips),
    ``attack`` and ``waves`` (waveform corruptions: the log-mel front end must run, no clip cache)."""
    items = {i["name"]: i for i in _yaml(CONFIGS / "robustness" / "sweep.yaml")["robustness"]["sweep"]}

    def item(name: str, values: list[float]) -> SweepItem:
        return SweepItem(**{**items[name], "values": values})

    return {"frames": [item("missing_audio", [1.0]), item("missing_visual", [1.0]),
                       item("visual_gaussian_blur", severities)],
            "attack": [item("pgd_visual", radii)], "waves": [item("audio_white_noise", severities)]}


def visual_only_items() -> list[SweepItem]:
    return [SweepItem(**i) for i in _yaml(CONFIGS / "robustness" / "visual_only.yaml")["robustness"]["sweep"]]


# ---------------------------------------------------------------------------------------------------------- training
def datamodules(root: Path, batch_size: int) -> tuple[AVEDataModule, AVEDataModule]:
    """(cached DataModule for training and most settings, plain one for waveform corruptions: its log-mel front end
    must run on every pass, which the decoded-clip cache of ``bench/balance.py`` would bypass)."""
    kwargs = dict(batch_size=batch_size, eval_batch_size=16, num_workers=0, image_size=64, audio=AUDIO,
                  persistent_workers=False)
    return CachedAVEDataModule(str(root), **kwargs), AVEDataModule(str(root), **kwargs)


def _trainer(out: Path, epochs: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks, default_root_dir=str(out), **kwargs)


def train_method(method: str, seed: int, dm: AVEDataModule, out: Optional[Path], epochs: int, lr: float,
                 stage2_epochs: int, lipschitz_batches: Optional[int]) -> AVETask:
    """The balance table's recipe for ``method``; ``crmt``: stage 1 for ``epochs``, then stage 2."""
    L.seed_everything(seed, workers=True)
    crmt = method == "crmt"
    task = AVETask(backbone=tiny_config(), head=HEAD, optim=OptimConfig(lr=lr, step_size=None), crmt=crmt)
    if out is None:  # the architecture only (weights loaded by the caller)
        return task
    callbacks = [CRMT(**crmt_callback_args(1)[0])] if crmt else METHODS[method]()
    _trainer(out, epochs, callbacks).fit(task, dm)
    if not crmt:
        return task
    stage1 = out / "stage1.ckpt"
    torch.save({"state_dict": task.state_dict()}, stage1)
    args, optim = crmt_callback_args(2)
    args["lipschitz_batches"] = lipschitz_batches
    L.seed_everything(seed, workers=True)
    stage2 = AVETask(backbone=tiny_config(), head=HEAD, optim=replace(OptimConfig(lr=lr, step_size=None), **optim),
                     crmt=True)
    init_weights(stage2, str(stage1))  # --run.init_from
    _trainer(out, stage2_epochs, [CRMT(**args)]).fit(stage2, dm)
    stage1.unlink()
    return stage2


def train_ablation(variant: str, seed: int, dm: AVEDataModule, out: Optional[Path], epochs: int,
                   lr: float) -> AVETask:
    L.seed_everything(seed, workers=True)
    task = AVETask(backbone=tiny_config(adapter=ABLATIONS[variant]), head=HEAD,
                   optim=OptimConfig(lr=lr, step_size=None))
    if out is None:  # the architecture only (weights loaded by the caller)
        return task
    _trainer(out, epochs, []).fit(task, dm)
    return task


# -------------------------------------------------------------------------------------------------------- evaluation
Phase = tuple[AVEDataModule, list[SweepItem], Optional[int]]  # data, series, test batches (None: all)


def evaluate(task: AVETask, phases: list[Phase], out: Path, extra: list[L.Callback] = ()) -> dict[str, Any]:
    """The CLI's ``test`` + ``robustness.sweep`` on ``task``: the clean test, then each phase's series (a phase
    limited to n test batches, ``--trainer.limit_test_batches n``, measures its own clean row on that subset)."""
    trainer = _trainer(out, 1, [RobustEval(None, str(out)), *extra], inference_mode=False)
    trainer.test(task, datamodule=phases[0][0], verbose=False)
    clean = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    rows: list[dict[str, Any]] = []
    for i, (dm, items, limit) in enumerate(phases):
        if limit is None:
            table = run_sweep(trainer, task, dm, items, out / f"robustness{i}.json", clean=clean)
        else:
            subset = _trainer(out, 1, [RobustEval(None)], inference_mode=False, limit_test_batches=limit)
            table = run_sweep(subset, task, dm, items, out / f"robustness{i}.json")
            rows.append({**table["rows"][0], "name": f"clean_subset_{i}"})
        rows += [{**r, "subset": limit is not None} for r in table["rows"][1:]]
    return {"clean": clean, "rows": [{"name": r["name"], "value": r["value"], "acc": r["metrics"][METRIC],
                                      "drop": r["relative_drop"][METRIC], "subset": r.get("subset", True)}
                                     for r in rows]}


def run_one(group: str, name: str, seed: int, train: Any, phases: list[Phase], out: Path, results: Path,
            reuse: bool = False) -> dict[str, Any]:
    """Train (or with ``reuse`` reload the weights saved by an earlier run), evaluate, append to ``results``."""
    folder = out / "runs" / f"{name}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    done = [json.loads(line) for line in results.read_text().splitlines()] if reuse and results.is_file() else []
    done = [r for r in done if (r["group"], r["method"], r["seed"]) == (group, name, seed)]
    if done:  # --reuse: a run already evaluated is kept as it is
        return done[-1]
    tic = time.perf_counter()
    if reuse and weights.is_file():
        saved = torch.load(weights, weights_only=True)
        task = train(None)
        task.load_state_dict(saved["state_dict"])
        train_s = saved["train_s"]
    else:
        task = train(folder)
        train_s = time.perf_counter() - tic
        torch.save({"state_dict": task.state_dict(), "train_s": train_s}, weights)
    extra = [CRMT(**crmt_callback_args(2)[0])] if task.crmt_fusion is not None else []  # the bound at test time
    tic = time.perf_counter()
    result = {"group": group, "method": name, "seed": seed, "train_s": round(train_s, 1),
              **evaluate(task, phases, folder, extra), "eval_s": round(time.perf_counter() - tic, 1)}
    if task.crmt_fusion is not None:  # where stage 2 left the integration weights (initialised at 0.1)
        result["crmt_a"] = {m: round(float(a.detach().mean()), 5) for m, a in task.crmt_fusion.a.items()}
    print(json.dumps(result), flush=True)
    with open(results, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------------------------ tables
def _mean_std(values: list[float], scale: float = 100.0) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.1f} ± {scale * std:.1f}"


def _series(result: dict[str, Any], name: str, key: str) -> float:
    """Mean of ``key`` over the rows of series ``name`` (the sweep's series mean; nan when undefined, e.g. the drop
    from a clean accuracy of 0)."""
    values = [r[key] for r in result["rows"] if r["name"] == name and r[key] is not None]
    return statistics.fmean(values) if values else math.nan


def _n(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    """`` (n seeds)`` when a row has fewer seeds than the table's."""
    total = len({r["seed"] for r in results})
    return f" ({len(rows)} seed{'s' * (len(rows) > 1)})" if len(rows) < total else ""


def _cell(rows: list[dict[str, Any]], name: str) -> str:
    if not all(any(x["name"] == name for x in r["rows"]) for r in rows):
        return "n/a"
    acc = [_series(r, name, "acc") for r in rows]
    if name.startswith("clean_subset"):
        return _mean_std(acc)
    drop = [_series(r, name, "drop") for r in rows]
    return f"{_mean_std(acc)} ({-100 * statistics.fmean(drop) + 0.0:+.1f} %)"  # relative change: minus the drop


def methods_tables(results: list[dict[str, Any]], methods: list[str]) -> str:
    series = [("missing_audio", "missing audio"), ("missing_visual", "missing video"),
              ("visual_gaussian_blur", "visual blur (mean of severities)"),
              ("clean_subset_1", "clean, first 16 test clips"),
              ("audio_white_noise", "audio noise (mean of severities; 16 clips)"),
              ("pgd_visual", "L2-PGD on frames (mean of radii; 16 clips)")]
    head = "| method | clean | " + " | ".join(s for _, s in series) + " | certified bound (mean) |"
    lines = [head, "|" + "---|" * (len(series) + 3)]
    for method in methods:
        rows = [r for r in results if r["group"] == "methods" and r["method"] == method]
        if not rows:
            continue
        bound = [r["clean"]["test/crmt_bound"] for r in rows if "test/crmt_bound" in r["clean"]]
        cells = [_mean_std([r["clean"][METRIC] for r in rows])] + [_cell(rows, s) for s, _ in series]
        cells.append(f"{statistics.fmean(bound):.3g} ± {statistics.stdev(bound) if len(bound) > 1 else 0:.2g}"
                     if bound else "n/a")
        lines.append(f"| {LABELS[method]}{_n(rows, results)} | " + " | ".join(cells) + " |")
    curves = curve_table(results, methods)
    return "\n".join(lines) + "\n\n" + curves


def curve_table(results: list[dict[str, Any]], methods: list[str]) -> str:
    """Accuracy per severity / radius (mean ± std over seeds)."""
    rows0 = next(r for r in results if r["group"] == "methods")["rows"]
    cols = [(r["name"], r["value"]) for r in rows0 if r["name"] in ("audio_white_noise", "visual_gaussian_blur",
                                                                      "pgd_visual")]
    short = {"audio_white_noise": "noise sev.", "visual_gaussian_blur": "blur sev.", "pgd_visual": "PGD r ="}
    lines = ["| method | " + " | ".join(f"{short[n]} {v:g}" for n, v in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for method in methods:
        rows = [r for r in results if r["group"] == "methods" and r["method"] == method]
        if not rows:
            continue
        cells = [_mean_std([next(x["acc"] for x in r["rows"] if (x["name"], x["value"]) == c) for r in rows])
                 for c in cols]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: list[dict[str, Any]]) -> str:
    lines = ["| AVMoE ablation, synthetic AVE | clean | visual-only (silent waveform) | relative drop |",
             "|---|---|---|---|"]
    for variant in ABLATIONS:
        rows = [r for r in results if r["group"] == "ablation" and r["method"] == variant]
        if not rows:
            continue
        clean = _mean_std([r["clean"][METRIC] for r in rows])
        vo = _mean_std([_series(r, "visual_only", "acc") for r in rows])
        drop = _mean_std([_series(r, "visual_only", "drop") for r in rows])
        lines.append(f"| {ABLATION_LABELS[variant]}{_n(rows, results)} | {clean} | {vo} | {drop} % |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------- main
def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/bench_robustness"))
    p.add_argument("--methods", nargs="*", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--ablation", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4, help="as bench/balance.py")
    p.add_argument("--stage2-epochs", type=int, default=1, help="CRMT stage 2 (official: n_epochs // 3 - 1)")
    p.add_argument("--num-train", type=int, default=48)
    p.add_argument("--num-test", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--severities", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--radii", nargs="+", type=float, default=[2.0, 8.0, 32.0],
                   help="L2 radii of the PGD on the normalised frames (a whole clip)")
    p.add_argument("--subset-batches", type=int, default=1,
                   help="PGD and audio-noise series on the first n test batches of 16 clips (0: all), each with its "
                        "own clean row on that subset")
    p.add_argument("--lipschitz-batches", type=int, default=4,
                   help="CRMT stage 2: training batches for the Lipschitz estimate (crmt_stage2.yaml: all; 0: all)")
    p.add_argument("--ablation-clips", type=int, default=24, help="train and test clips of the ablation release")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--table-only", action="store_true", help="train nothing: rebuild the section from the results")
    p.add_argument("--reuse", action="store_true",
                   help="re-evaluate the weights an earlier run saved (<out>/runs/*/model.pt) instead of training")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> str:
    args = parse(argv)
    args.lipschitz_batches = args.lipschitz_batches or None
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "robustness_results.jsonl"
    started = datetime.now(timezone.utc)
    if not args.table_only:
        series = sweep_items(args.severities, args.radii)
        root = make_release(args.out / "imbalanced", args.num_train, args.num_test)
        cached, plain = datamodules(root, args.batch_size)
        limit = args.subset_batches or None
        phases = [(cached, series["frames"], None), (cached, series["attack"], limit), (plain, series["waves"], limit)]
        ave = args.out / "ave"
        if args.ablation and not (ave / "testSet.txt").is_file():
            write_ave_release(ave, num_train=args.ablation_clips, num_val=4, num_test=args.ablation_clips, fps=2)
        ave_dm = datamodules(ave, args.batch_size)[0] if args.ablation else None
        for seed in args.seeds:  # seed-major: an interrupted run leaves whole seeds of both parts
            for method in args.methods:
                run_one("methods", method, seed,
                        lambda f, m=method, s=seed: train_method(m, s, cached, f, args.epochs, args.lr,
                                                                 args.stage2_epochs, args.lipschitz_batches),
                        phases, args.out, results_path, args.reuse)
            for variant in args.ablation:
                run_one("ablation", variant, seed,
                        lambda f, v=variant, s=seed: train_ablation(v, s, ave_dm, f, args.epochs, args.lr),
                        [(ave_dm, visual_only_items(), None)], args.out, results_path, args.reuse)
    lines = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    results = list({(r["group"], r["method"], r["seed"]): r for r in lines}.values())  # a rerun replaces a run
    body = report(results, args, started)
    print(body)
    if not args.no_write:
        replace_section(SECTION, body, keep_from="**Reading")  # the hand-written reading stays for revision
    return body


def report(results: list[dict[str, Any]], args: argparse.Namespace, started: datetime) -> str:
    seeds = sorted({r["seed"] for r in results})
    minutes = sum(r["train_s"] + r["eval_s"] for r in results) / 60
    methods = [m for m in LABELS if any(r["group"] == "methods" and r["method"] == m for r in results)]
    setup = (f"Script: `python bench/robustness.py` (tables written {started:%Y-%m-%d %H:%M} UTC; "
             f"{platform.machine()} CPU, "
             f"{args.threads} torch thread(s), {minutes:.1f} min of training and evaluation in all). "
             f"Methods: the synthetic imbalanced release and recipe of `bench/balance.py` (dominant visual, "
             f"weak_contrast {WEAK_CONTRAST}; {args.num_train} train / {args.num_test} test clips, 4 categories; "
             f"tiny AVMoE, Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs; CRMT: stage 1 "
             f"{args.epochs} epochs with `crmt_stage1.yaml`, stage 2 {args.stage2_epochs} epoch with "
             f"`crmt_stage2.yaml`), seeds {' '.join(map(str, seeds))}. Every model is evaluated by `RobustEval` + "
             f"`run_sweep` (the code path of `lightning test --config lightning_configs/robustness/sweep.yaml`) "
             f"with the series of `sweep.yaml` cut to missing rate 1.0, severities "
             f"{'/'.join(map(str, args.severities))} and PGD radii {'/'.join(f'{r:g}' for r in args.radii)} on "
             f"the normalised frames (L2 over a whole clip, 4 steps of radius/3). For time, the audio-noise and "
             f"PGD series run on the first {16 * args.subset_batches} test clips "
             f"(`--trainer.limit_test_batches {args.subset_batches}`, eval batch 16) with their own clean row on "
             f"those clips, and CRMT's stage-2 Lipschitz estimate uses the first "
             f"{args.lipschitz_batches or 'all'} training batches (`lipschitz_batches`; the config: all). "
             f"AVE segment accuracy on the test split in %, mean ± std over seeds; in brackets the mean relative "
             f"change from the clean accuracy on the same clips. Ablation: `write_ave_release` with "
             f"{args.ablation_clips} train / {args.ablation_clips} test clips (4 categories, every clip's picture "
             f"and sound carry its class), the same recipe.")
    return (f"{SECTION}\n\n{setup}\n\n{methods_tables(results, methods)}\n\n{ablation_table(results)}\n")


if __name__ == "__main__":
    main()
