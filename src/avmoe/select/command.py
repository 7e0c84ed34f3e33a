"""``lightning select`` / ``avmoe select``: choose which unlabelled train clips to annotate first.

    lightning select --config lightning_configs/select/ave.yaml --select.budget '[20, 40]'

Reads the train split of any release through its DataModule (labels ignored), embeds the pool with the AVMoE
backbone (cached in the run folder), runs the chosen strategy and writes, under ``<select.run_dir>``:

- ``features/pool.pt``: the pooled features (reused by later runs on the same pool; ``features_adapters/`` and
  ``stage1_adapters.pt`` when ``select.adapter_epochs`` > 0 trains the adapters first);
- ``budget_<B>/``: a mirror of the release root whose train split file holds only the B selected samples
  (nested: budget_40 contains budget_20); train with the normal config and ``--data.init_args.root`` there;
- ``selection.json``: strategy, budgets, the selection order (IDs), per-sample scores and, for MMCSAL, the
  modality gap before/after stage 1 with and without prototypes.

Processes: ``select.devices`` > 1 (or a ``torchrun`` launch) shards the embedding over the ranks (Lightning
Fabric); selection then runs on the gathered features, identically on every rank, and rank zero writes.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

import avmoe.datamodules  # noqa: F401  (registers the DataModule subclasses for class_path shorthands)
from avmoe.datamodules.base import AVDataModule
from avmoe.files import write_json_atomic
from avmoe.models.avmoe import AVMoEBackbone
from avmoe.models.config import AVMoEConfig

from .adapters import train_adapters
from .features import embed_pool, load_backbone_weights
from .mmcsal import Stage2Config
from .splits import build_pool, write_selected_root
from .stage1 import Stage1Config, embed, modality_gap, train_stage1
from .strategies import BaselineConfig, StrategyName, View, select_order


@dataclass
class SelectConfig:
    """What to select, how, and where the results go."""

    budget: Union[int, list[int]] = 100
    """Number of samples to select; a list writes one nested subset per budget."""
    strategy: StrategyName = "mmcsal"
    view: View = "concat"
    """Baselines: the features they see (``concat`` [a, v] / sqrt(2), ``audio`` or ``visual``); ``mmcsal`` uses both."""
    features: str = "frozen"
    """Baselines: ``frozen`` pooled backbone features or ``stage1`` embeddings (MMCSAL always uses stage 1 unless
    ``stage1.enabled`` is false)."""
    seed: int = 0
    run_dir: str = "runs/select"
    """Run folder: features/, budget_<B>/, selection.json."""
    checkpoint: Optional[str] = None
    """Task checkpoint whose ``backbone.*`` weights (adapters) are loaded before embedding."""
    adapter_epochs: int = 0
    """> 0: before embedding, train the MoE adapters with the stage-1 loss through the backbone for this many
    epochs (``avmoe.select.adapters``; weights in <run_dir>/stage1_adapters.pt, features in features_adapters/).
    0: frozen encoders with the adapters as initialised (gated to zero) or from ``checkpoint``."""
    adapter_lr: float = 1e-4
    batch_size: int = 8
    num_workers: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    flush_every: int = 20
    """Embedding: save the rank's shard every this many batches (resume point)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    gap_ablation: bool = True
    """MMCSAL: also train stage 1 without prototypes, only to report its gap next to the one with prototypes."""


def budgets_of(cfg: SelectConfig) -> list[int]:
    budgets = [cfg.budget] if isinstance(cfg.budget, int) else list(cfg.budget)
    if not budgets or any(int(b) < 1 for b in budgets):
        raise ValueError(f"select.budget must be positive integer(s), got {cfg.budget!r}")
    return sorted(set(int(b) for b in budgets))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning select", description=__doc__.split("\n")[0], default_env=True)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(AVDataModule, "data", required=True)
    parser.add_class_arguments(AVMoEConfig, "backbone")
    parser.add_class_arguments(SelectConfig, "select")
    return parser


def stage1_embeddings(audio: np.ndarray, visual: np.ndarray, cfg: SelectConfig, report: dict) -> tuple[np.ndarray, np.ndarray]:
    """Train stage 1 (and the no-prototype ablation) and return the normalised embeddings; gaps go to ``report``."""
    log: list[dict] = []
    heads = train_stage1(audio, visual, cfg.stage1, seed=cfg.seed, log=log)
    za, zv = embed(heads, audio, visual)
    report["stage1"] = {"gap_before": log[0]["gap"], "gap_after": modality_gap(za, zv), "log": log,
                        "config": dataclasses.asdict(cfg.stage1)}
    if cfg.gap_ablation and cfg.stage1.proto_weight > 0:
        plain = dataclasses.replace(cfg.stage1, proto_weight=0.0)
        heads0 = train_stage1(audio, visual, plain, seed=cfg.seed)
        report["stage1"]["gap_after_without_prototypes"] = modality_gap(*embed(heads0, audio, visual))
    return za, zv


def run_select(data: AVDataModule, backbone_cfg: AVMoEConfig, cfg: SelectConfig) -> dict[str, Any]:
    """Embed, select and write (see module docstring); returns the ``selection.json`` payload."""
    from lightning.fabric import Fabric  # noqa: PLC0415

    budgets = budgets_of(cfg)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices,
                    strategy="ddp" if cfg.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if fabric.global_rank == 0:
        data.prepare_data()
    fabric.barrier()
    pool = build_pool(data)
    if len(pool.ids) == 0:
        raise ValueError(f"the train split of {data.root} is empty: nothing to select from")
    if budgets[-1] > len(pool.ids):
        raise ValueError(f"select.budget {budgets[-1]} is larger than the pool ({len(pool.ids)} samples in the train "
                         f"split of {data.root})")
    backbone = AVMoEBackbone(backbone_cfg)
    load_backbone_weights(backbone, cfg.checkpoint)
    report: dict[str, Any] = {"strategy": cfg.strategy, "view": cfg.view, "budgets": budgets, "seed": cfg.seed,
                              "pool_size": len(pool.ids), "root": str(data.root), "world_size": fabric.world_size}
    features_dir = run_dir / "features"
    if cfg.adapter_epochs > 0:
        adapter_log: list[dict] = []
        backbone = train_adapters(fabric, backbone, data.dataset("train"), pool.positions, cfg.adapter_epochs,
                                  cfg.stage1, run_dir, cfg.batch_size, cfg.num_workers, cfg.adapter_lr, cfg.seed,
                                  adapter_log)
        report["stage1_adapters"] = adapter_log
        features_dir = run_dir / "features_adapters"
    audio, visual = embed_pool(backbone, data.dataset("train"), pool.positions, pool.ids, features_dir,
                               cfg.batch_size, cfg.num_workers, cfg.seed, fabric.device, cfg.flush_every)
    use_stage1 = cfg.stage1.enabled and (cfg.strategy == "mmcsal" or cfg.features == "stage1")
    if use_stage1:
        audio, visual = stage1_embeddings(audio, visual, cfg, report)
    info: dict[str, Any] = {}
    order = select_order(cfg.strategy, audio, visual, budgets, cfg.seed, cfg.view, cfg.baseline, cfg.stage2, info)
    report["order"] = [pool.ids[i] for i in order]
    rank_of = {int(p): r for r, p in enumerate(order)}
    report["samples"] = [
        {"id": pool.ids[u], "position": int(u), "rank": rank_of.get(u),
         **{k: float(v[u]) for k, v in info.items() if isinstance(v, np.ndarray) and not np.isnan(v[u])}}
        for u in range(len(pool.ids))]
    if "delta" in info:
        report["delta"] = info["delta"]
    if fabric.global_rank == 0:
        report["split_files"] = {}
        for b in budgets:
            path = write_selected_root(data, pool, order[:b], run_dir / f"budget_{b}")
            report["split_files"][str(b)] = str(path)
        write_json_atomic(run_dir / "selection.json", report)
    fabric.barrier()
    return report


def select_main(args: Optional[list[str]] = None) -> dict[str, Any]:
    """Entry point of ``lightning select`` (argv after ``select``)."""
    argv = sys.argv[2:] if args is None else args
    # field docstrings become --help text; parsing them reads every config class's source, so only for help
    set_parsing_settings(docstring_parse_attribute_docstrings=any(str(a) in ("-h", "--help") for a in argv))
    parser = build_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    return run_select(init.data, init.backbone, init.select)
