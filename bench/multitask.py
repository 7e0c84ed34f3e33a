"""Joint vs single-task training at the same compute, on the synthetic AVE and LLP (AVVP) releases.

Each seed trains the tiny AVMoE (``tiny_config``) three ways with the same number of optimizer steps ``S`` in all:

- ``single``: one model per task, ``S / 2`` steps each (the compute of one joint run, split);
- ``joint``: one backbone + both heads, ``S`` steps, round-robin task sampling (each head sees ``S / 2`` batches,
  the backbone ``S``);
- ``joint_task_routers``: the same with one router per task over the shared experts.

and reports the test metric of each task (AVE segment accuracy, AVVP segment-level Type@AV F1) and, for the joint
runs, how differently the tasks route: the total-variation distance between the two tasks' mean router
distributions, averaged over the MoE modules (0: identical routing, 1: disjoint experts), on the validation clips.
Writes the section ``## Multitask`` of ``bench/BENCHMARKS.md`` (mean +- std over seeds).

    python bench/multitask.py                      # the table
    python bench/multitask.py --seeds 0 --steps 8 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import lightning as L
import torch

from avmoe.datamodules import AVEDataModule, LLPDataModule, LogMelConfig, MultitaskDataModule
from avmoe.datamodules.synthetic.ave import write_ave_release
from avmoe.datamodules.synthetic.llp import write_llp_release
from avmoe.models.presets import tiny_config
from avmoe.tasks import AVETask, AVVPTask, MultitaskModule
from avmoe.tasks.base import OptimConfig

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import replace_section  # noqa: E402

SECTION = "## Multitask"
HEADS = {"ave": {"visual_dim": 32, "audio_dim": 16, "d_model": 32, "num_heads": 2, "ff_dim": 64, "num_layers": 1,
                 "topk": 2},
         "avvp": {"arch": "mmil", "dim": 32, "num_heads": 1}}
CLASSES = {"ave": AVETask, "avvp": AVVPTask}
METRIC = {"ave": "acc", "avvp": "segment_type"}
OPTIM = OptimConfig(lr=2e-3, step_size=None)


def datamodules(root: Path, seed: int) -> dict[str, Any]:
    common = {"batch_size": 4, "num_workers": 0, "image_size": 64, "audio": LogMelConfig(n_mels=32), "seed": seed}
    return {"ave": AVEDataModule(str(root / "ave"), **common), "avvp": LLPDataModule(str(root / "llp"), **common)}


def trainer(steps: int, folder: Path) -> L.Trainer:
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=folder)


@torch.no_grad()
def routing_distance(model: MultitaskModule, dms: dict[str, Any]) -> float:
    """Mean over MoE modules of the total-variation distance between the tasks' mean router distributions."""
    means = {}
    model.eval()
    for name, dm in dms.items():
        dm.setup("validate")
        sums: list[torch.Tensor] = []
        count = 0
        for batch in dm.val_dataloader():
            batch["task"] = name
            model.member(batch)  # routes the backbone for this task
            feats = model.encode(batch)
            weights = [w.float().sum(0) for w in feats.router_weights]  # per module (E,)
            sums = weights if not sums else [a + b for a, b in zip(sums, weights)]
            count += feats.router_weights[0].shape[0]
        means[name] = [s / count for s in sums]
    a, b = means.values()
    return float(torch.stack([0.5 * (x - y).abs().sum() for x, y in zip(a, b)]).mean())


def test_metric(model: Any, dm: Any, folder: Path, key: str) -> float:
    result = trainer(1, folder).test(model, datamodule=dm, verbose=False)[0]
    return float(result[key])


def run_seed(seed: int, steps: int, root: Path, folder: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("ave", "avvp"):
        L.seed_everything(seed, verbose=False)
        model = CLASSES[name](backbone=tiny_config(), head=HEADS[name], optim=OPTIM)
        dm = datamodules(root, seed)[name]
        trainer(steps // 2, folder).fit(model, datamodule=dm)
        out[f"single/{name}"] = test_metric(model, dm, folder, f"test/{METRIC[name]}")
    for variant, routers in (("joint", False), ("joint_task_routers", True)):
        L.seed_everything(seed, verbose=False)
        tasks = {n: {"class_path": f"avmoe.tasks.{CLASSES[n].__name__}", "init_args": {"head": copy.deepcopy(HEADS[n])}}
                 for n in ("ave", "avvp")}
        model = MultitaskModule(tasks=tasks, backbone=tiny_config(), optim=OPTIM, task_routers=routers)
        dms = datamodules(root, seed)
        dm = MultitaskDataModule(dms, sampling="round_robin", steps_per_epoch=steps, seed=seed)
        trainer(steps, folder).fit(model, datamodule=dm)
        result = trainer(1, folder).test(model, datamodule=dm, verbose=False)
        merged = {k: v for r in result for k, v in r.items()}
        for name in ("ave", "avvp"):
            out[f"{variant}/{name}"] = float(merged[f"test/{name}/{METRIC[name]}"])
        out[f"{variant}/routing_tv"] = routing_distance(model, datamodules(root, seed))
    return out


def table(results: list[dict[str, float]], args: argparse.Namespace, seconds: float) -> str:
    def cell(key: str) -> str:
        values = [r[key] for r in results if key in r]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    lines = [SECTION, "",
             f"Measured {date.today()} on {platform.processor() or platform.machine()} (CPU, 1 thread), "
             f"`python bench/multitask.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}` "
             f"({seconds / 60:.1f} min). Synthetic AVE and LLP releases, tiny AVMoE, {args.steps} optimizer steps "
             f"per setting in all (single-task: {args.steps // 2} per task). Mean ± std over {len(results)} "
             "seed(s).", "",
             "| setting | AVE test acc | AVVP test segment Type@AV | routing TV distance AVE vs AVVP |",
             "|---|---|---|---|"]
    for variant in ("single", "joint", "joint_task_routers"):
        lines.append(f"| {variant} | {cell(f'{variant}/ave')} | {cell(f'{variant}/avvp')} | "
                     f"{cell(f'{variant}/routing_tv')} |")
    return "\n".join(lines) + "\n"


def main(argv: Any = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/bench_multitask"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.root / "ave").exists():
        write_ave_release(args.root / "ave", num_train=24, num_val=8, num_test=12, num_categories=3, seed=0)
    if not (args.root / "llp").exists():
        write_llp_release(args.root / "llp", num_train=24, num_val=8, num_test=12, num_categories=3, seed=0)
    start = time.time()
    results = [run_seed(s, args.steps, args.root, args.root / "runs") for s in args.seeds]
    text = table(results, args, time.time() - start)
    print(text)
    if not args.no_write:
        replace_section(SECTION, text, keep_from="Reading")  # a hand-written reading is revised, not dropped
    return results


if __name__ == "__main__":
    main()
