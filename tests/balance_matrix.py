"""Every balancing callback on every task: short real fits, run in-process (1 process) or by two ranks of an
externally launched CPU DDP job (gloo), each rank looping over all the combinations in one process.

Used by ``tests/test_balance_matrix.py``; run as ``python -m tests.balance_matrix SPEC.json`` by each DDP rank
(``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set by the test, so Lightning joins the job instead of launching one).

Per task: a baseline fit (no balancing callback), one fit per callback, and one fit with every callback at
once (``all``) that keeps its epoch-0 checkpoint, plus (``resume``) a fit resumed from that checkpoint. Each fit
is 2 epochs of 1 optimizer step (1 epoch for a callback alone that acts from the first step, ``ONE_EPOCH``) on a
few real decoded samples (decoded once per process and memoised). Results per fit: a SHA-256 of the parameters
(the baseline's also after each epoch), each callback's own counter, the metrics it logged, its wall time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import Dataset

from avmoe.callbacks import OGM, OGMGE, OPM, MMPareto, ModalityValuation, Relearning, StepSeeding
from avmoe.callbacks._distributed import parameter_digest
from tests.helpers import calm_gc, task_fit_args

# Per split (limit_samples): training uses 1 batch per epoch (2 samples; DDP: 1 per rank); the feature passes of
# valuation and D&R read all of them (DDP: 3 per rank and split). With 4, D&R's purities tie on AVVP (alpha 0).
NUM_SAMPLES = 6
EVAL_BATCH = NUM_SAMPLES  # the feature passes in one batch per split (DDP: per rank)
CALLBACKS: dict[str, Callable[[], L.Callback]] = {
    "ogm_ge": lambda: OGMGE(alpha=1.0, noise=True, end_epoch=None),
    "ogm": lambda: OGM(alpha=1.0, noise=False, warmup_epochs=0, end_epoch=None),
    "opm": lambda: OPM(q_base=0.5, lam=0.5, p_exe=1.0, warmup_epochs=0),
    "valuation": lambda: ModalityValuation(warmup_epochs=1, log_histograms=False),
    "mmpareto": lambda: MMPareto(),
    "relearning": lambda: Relearning(every_n_epochs=1, max_times=1, num_clusters=2, lam=3.0),
}
# Alone, the callbacks without a warm-up act from the first step: their fits stop after epoch 0 (1 step) and are
# compared with the baseline's parameters after epoch 0; the others (valuation: warm-up 1, D&R: after epoch 1)
# and the fits with every callback run 2 epochs.
ONE_EPOCH = {"ogm_ge", "ogm", "opm", "mmpareto"}
COUNTERS = {"ogm_ge": "num_modulated", "ogm": "num_modulated", "opm": "num_executed", "valuation": "valued_epoch",
            "mmpareto": "num_combined", "relearning": "done_epochs"}
_CACHE: dict[tuple[str, str, str, int], Any] = {}


class Memo(Dataset):
    """A split's Dataset whose decoded samples are kept for the process (every fit reads the same clips)."""

    def __init__(self, dataset: Dataset, key: tuple[str, str, str]) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        k = (*self.key, int(i))
        if k not in _CACHE:
            _CACHE[k] = self.dataset[i]
        return _CACHE[k]


_PARSED: dict[str, Any] = {}


def build(task: str, release: str, root: Path, batch_size: int, **overrides: Any) -> tuple[Any, Any]:
    """A fresh (model, datamodule) of ``task``'s demo config, parsed once per process (per ``overrides``)."""
    from avmoe.cli import AVMoECLI  # noqa: PLC0415
    from avmoe.datamodules import AVDataModule  # noqa: PLC0415
    from avmoe.tasks.base import AVTask  # noqa: PLC0415

    key = f"{task}-{batch_size}-{release}-{sorted(overrides.items())}"
    if key not in _PARSED:
        args = task_fit_args(task, Path(release), root, batch_size=batch_size,
                             **{"data.init_args.limit_samples": NUM_SAMPLES,
                                "data.init_args.eval_batch_size": EVAL_BATCH, **overrides})
        cli = AVMoECLI(AVTask, AVDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                       auto_configure_optimizers=False, args=args, save_config_callback=None)
        _PARSED[key] = (cli.parser, cli.config)
    parser, config = _PARSED[key]
    torch.manual_seed(0)
    init = parser.instantiate_classes(config)
    model, dm = init["model"], init["data"]
    dm.setup("fit")
    for split in ("train", "val"):
        dm._datasets[split] = Memo(dm._datasets[split], (task, split, release))
    return model, dm


def _callbacks(method: str) -> list[L.Callback]:
    if method == "baseline":
        return []
    if method == "all":  # composable: MMPareto's policy, then OGM-GE and OGM on its gradients, OPM, data plans
        return [CALLBACKS[m]() for m in CALLBACKS]
    return [CALLBACKS[method]()]


def _counter(callback: L.Callback) -> float:
    name = next(m for m, make in CALLBACKS.items() if type(make()) is type(callback))
    value = getattr(callback, COUNTERS[name])
    return float(len(value)) if isinstance(value, list) else float(value)


class EpochDigests(L.Callback):
    """The parameters' SHA-256 at the end of every training epoch (the baseline's, for the 1-epoch fits)."""

    def __init__(self) -> None:
        self.digests: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.digests.append(parameter_digest(pl_module)["sha256"])


def fit(task: str, method: str, release: str, root: Path, devices: int, ckpt: str | None = None) -> dict[str, Any]:
    tic = time.perf_counter()
    L.seed_everything(0, verbose=False)
    model, dm = build(task, release, root, batch_size=2 if devices == 1 else 1)
    callbacks = _callbacks(method)
    digests = EpochDigests()
    epochs = 1 if method in ONE_EPOCH else 2
    save = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=method == "all", default_root_dir=str(root),
                        callbacks=[StepSeeding(), *callbacks, *([save] if method == "all" else []),
                                   *([digests] if method == "baseline" else [])])
    trainer.fit(model, dm, ckpt_path=ckpt)
    return {"sha": parameter_digest(model)["sha256"], "epochs": epochs, "sha_epochs": digests.digests,
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "counters": [_counter(c) for c in callbacks],
            "logged": sorted({k.split("/")[0] for k in trainer.callback_metrics if "/" in k} - {"train", "val"}),
            "seconds": round(time.perf_counter() - tic, 2)}


def run_all(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``: releases (task -> path), root, devices, methods (fits of one callback), resume. Results by
    ``task/method``; ``task/all`` and (``resume``) ``task/all/resumed`` always."""
    results: dict[str, Any] = {}
    root = Path(spec["root"])
    for task, release in spec["releases"].items():
        for method in ["baseline", *spec["methods"], "all"]:
            results[f"{task}/{method}"] = fit(task, method, release, root / task / method, spec["devices"])
        if spec.get("resume"):
            ckpt = str(root / task / "all" / "ckpt" / "epoch=0.ckpt")
            results[f"{task}/all/resumed"] = fit(task, "all", release, root / task / "resumed", spec["devices"],
                                                 ckpt=ckpt)
    return results


class EmptySteps(L.Callback):
    """Counts this rank's training batches without a usable sample (every clip skipped)."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from avmoe.datamodules.batch import batch_size  # noqa: PLC0415

        self.count += int(batch_size(batch) == 0)


def run_skip(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``: release (an AVE release with a broken clip), root. MMPareto under DDP, batch 1 per rank, the
    broken clip skipped (``on_decode_error: skip``): 1 epoch of 2 steps, one of them empty on one rank."""
    L.seed_everything(0, verbose=False)
    model, dm = build("ave", spec["release"], Path(spec["root"]), batch_size=1,
                      **{"data.init_args.on_decode_error": "skip", "data.init_args.limit_samples": 6})
    pareto, empty = MMPareto(), EmptySteps()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
                        max_epochs=1, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=spec["root"],
                        callbacks=[StepSeeding(), pareto, empty])
    trainer.fit(model, dm)
    return {"skip": {"sha": parameter_digest(model)["sha256"],
                     "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                     "num_combined": pareto.num_combined, "empty_steps": empty.count,
                     "global_step": trainer.global_step}}


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(1)
    calm_gc()
    results = run_skip(spec) if spec.get("kind") == "skip" else run_all(spec)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    (Path(spec["root"]) / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
