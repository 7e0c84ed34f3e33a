"""Balancing methods on a synthetic imbalanced AVE release: does each method train the weak modality more?

Writes (if absent) an imbalanced release (``avmoe.datamodules.synthetic.imbalanced``: the picture carries the
label, the sound only weakly; on a quarter of the clips the picture is blank and only the sound can tell the
class), trains the tiny AVMoE (``tiny_config``) with the plain recipe and with each balancing callback for
several seeds, and evaluates on the test split:

- ``fused``: the official AVE segment accuracy;
- ``audio only`` / ``visual only``: the same with the other modality's features zeroed before the head (the
  uni-modal probe the callbacks use by default; for the ``*_aux`` methods, whose callbacks read auxiliary
  uni-modal heads, the auxiliary heads' own accuracies go to the results file as ``aux_audio``/``aux_visual``);
- ``fused, blank-picture clips``: segment accuracy on the test clips whose dominant modality is blank, where
  only the weak modality can name the event.

Then it merges its rows into the tables of the section ``## Balancing methods`` of ``bench/BENCHMARKS.md`` (mean
+- std over seeds, and min..max; a method run now replaces its recorded row, the rows of the methods not run now
and the section's text are kept; ``--replace`` writes the section afresh). CPU, one thread by default; clips are
decoded once (real decoders) and kept in memory.

    python bench/balance.py                                   # the BENCHMARKS.md table (~22 min on 2 cores)
    python bench/balance.py --seeds 0 --epochs 1 --methods baseline ogm_ge --no-write   # smoke run

Epoch windows are scaled to the short runs: OGM/OPM warm-ups of 1 epoch (journal code: 6 of 100), valuation
re-sampling from the end of epoch 1 (official warm-up 5 of 60), D&R re-initialisation after epochs 1 and 2
(official: after epochs 20, 40, 60 of 90).

    python bench/balance.py --step-cost                        # MMPareto step time vs the baseline's (no table)

``--step-cost`` also times whole epochs of the baseline and of Diagnosing & Re-learning (its feature pass over
the train and validation clips at the end of epochs 1 and 2). The release must match the flags it was written
with: delete ``--root`` after changing ``--num-train``/``--num-test``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pandas as pd
import torch
from torch.utils.data import Dataset

from avmoe.callbacks import OGM, OGMGE, OPM, MMPareto, ModalityValuation, Relearning
from avmoe.datamodules import AVEDataModule, LogMelConfig
from avmoe.datamodules.synthetic.imbalanced import write_imbalanced_ave_release
from avmoe.metrics.ave import ave_segment_predictions
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.presets import tiny_config
from avmoe.tasks.ave import AVETask
from avmoe.tasks.base import OptimConfig, UnimodalConfig

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import replace_section  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Balancing methods"
AUDIO = LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32, fmax=8000.0)
HEAD = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2)
METHODS: dict[str, Callable[[], list[L.Callback]]] = {
    "baseline": lambda: [],
    "ogm_ge": lambda: [OGMGE(alpha=0.8, noise=True, end_epoch=None)],
    "ogm_ge_smooth": lambda: [OGMGE(alpha=0.8, noise=True, smooth=True, end_epoch=None)],
    "ogm": lambda: [OGM(alpha=0.8, noise=False, warmup_epochs=1, end_epoch=None)],
    "opm": lambda: [OPM(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=1)],
    "valuation": lambda: [ModalityValuation(resample="sample", warmup_epochs=2, log_histograms=False)],
    "valuation_modality": lambda: [ModalityValuation(resample="modality", warmup_epochs=2, log_histograms=False)],
    "baseline_aux": lambda: [],
    "ogm_ge_aux": lambda: [OGMGE(alpha=0.8, noise=True, end_epoch=None)],
    "opm_aux": lambda: [OPM(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=1)],
    "baseline_2x": lambda: [],
    "mmpareto": lambda: [MMPareto(gamma=1.5)],
    "mmpareto_aux": lambda: [MMPareto(gamma=1.5)],
    "relearning": lambda: [Relearning(lam=3.0, every_n_epochs=1, max_times=2)],
}
AUX_METHODS = {"baseline_aux", "ogm_ge_aux", "opm_aux", "mmpareto_aux"}  # model.unimodal.mode = aux (aux heads)
EPOCH_SCALE = {"baseline_2x": 2}  # compute control: valuation's re-sampled epochs are 2-3x larger
LABELS = {
    "baseline": "baseline (joint training)",
    "ogm_ge": "OGM-GE (alpha 0.8, GE noise)",
    "ogm_ge_smooth": "OGM-GE smooth (alpha 0.8, relu(rho - 1))",
    "ogm": "OGM, journal (alpha 0.8, warm-up 1)",
    "opm": "OPM (q_base 0.5, lambda 0.5, p_exe 0.7, warm-up 1)",
    "valuation": "valuation, sample level (warm-up 2)",
    "valuation_modality": "valuation, modality level (warm-up 2)",
    "baseline_aux": "baseline + auxiliary uni-modal heads (unimodal.mode aux)",
    "ogm_ge_aux": "OGM-GE scored by auxiliary heads",
    "opm_aux": "OPM scored by auxiliary heads",
    "baseline_2x": "baseline, twice the epochs (compute control)",
    "mmpareto": "MMPareto (gamma 1.5), uni-modal losses of the zeroed-feature head",
    "mmpareto_aux": "MMPareto (gamma 1.5), auxiliary uni-modal heads (official form)",
    "relearning": "Diagnosing & Re-learning (lambda 3, after epochs 1 and 2)",
}
_CACHE: dict[tuple[str, str, int], Any] = {}


class CachedDataset(Dataset):
    """Decode each clip once (through the real decoders) and serve copies afterwards (benchmark speed only)."""

    def __init__(self, base: Any, key: tuple[str, str]) -> None:
        self.base, self.key = base, key
        self.video_ids = getattr(base, "video_ids", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        key = (*self.key, int(index))
        if key not in _CACHE:
            _CACHE[key] = self.base[index]
        sample = _CACHE[key]
        return dict(sample) if isinstance(sample, dict) else sample


class CachedAVEDataModule(AVEDataModule):
    def build_dataset(self, split: str) -> Dataset:
        return CachedDataset(super().build_dataset(split), (str(self.root), split))


WEAK_CONTRAST = 0.5


def make_release(root: Path, num_train: int, num_test: int) -> Path:
    if not (root / "imbalance.csv").is_file():
        print(f"writing the imbalanced release to {root} ...", flush=True)
        write_imbalanced_ave_release(root, dominant="visual", num_train=num_train, num_val=4, num_test=num_test,
                                     num_categories=4, seed=0, size=64, fps=2, weak_contrast=WEAK_CONTRAST)
    return root


def blank_clips(root: Path) -> set[str]:
    flags = pd.read_csv(root / "imbalance.csv", comment="#")
    return set(flags.loc[flags["dominant_blank"] == 1, "video_id"].astype(str))


@torch.no_grad()
def evaluate(task: AVETask, dm: AVEDataModule, blank: set[str]) -> dict[str, float]:
    """Segment accuracy of the fused prediction, of each modality alone, and on the blank-dominant clips."""
    task.eval()
    correct = {"fused": 0.0, "audio": 0.0, "visual": 0.0, "fused_blank": 0.0}
    total = {"all": 0, "blank": 0}
    for batch in dm.test_dataloader():
        batch.pop("skipped", None)
        feats = task.encode(batch)
        outputs = {"fused": task.head_forward(feats, batch), **task.unimodal_outputs(feats, batch, mode="zero")}
        if task.unimodal_heads is not None:
            aux = task.unimodal_outputs(feats, batch, mode="aux")
            outputs.update({f"aux_{m}": out for m, out in aux.items()})
        label = batch["label"]  # (B, T)
        is_blank = torch.tensor([vid in blank for vid in batch["video_id"]])
        for name, out in outputs.items():
            hits = (ave_segment_predictions(out["is_event"], out["event_scores"]) == label).float()  # (B, T)
            correct[name] = correct.get(name, 0.0) + hits.sum().item()
            if name == "fused":
                correct["fused_blank"] += hits[is_blank].sum().item()
        total["all"] += label.numel()
        total["blank"] += int(is_blank.sum()) * label.shape[1]
    result = {name: value / total["all"] for name, value in correct.items() if name != "fused_blank"}
    return {**result, "fused_blank": correct["fused_blank"] / max(total["blank"], 1)}


class Diagnostics(L.Callback):
    """Averages what the balancing callbacks report per step (``last``) and per epoch (``summary``)."""

    def __init__(self, watched: list[L.Callback]) -> None:
        self.watched = watched
        self.sums: dict[str, list[float]] = {}

    def _add(self, prefix: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and value == value:  # not nan
                self.sums.setdefault(f"{prefix}/{key}", []).append(float(value))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        for cb in self.watched:
            if getattr(cb, "last", None):
                self._add(getattr(cb, "prefix", type(cb).__name__.lower()), cb.last)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for cb in self.watched:
            if getattr(cb, "summary", None) and trainer.current_epoch >= getattr(cb, "warmup_epochs", 0) - 1:
                self._add("valuation", cb.summary)

    def means(self) -> dict[str, float]:
        return {k: round(statistics.fmean(v), 4) for k, v in sorted(self.sums.items())}


def run_one(method: str, seed: int, root: Path, epochs: int, batch_size: int, lr: float,
            blank: set[str]) -> dict[str, Any]:
    L.seed_everything(seed, workers=True)
    unimodal = UnimodalConfig(mode="aux" if method in AUX_METHODS else "zero")
    task = AVETask(backbone=tiny_config(), head=HEAD, optim=OptimConfig(lr=lr, step_size=None), unimodal=unimodal)
    dm = CachedAVEDataModule(str(root), batch_size=batch_size, eval_batch_size=16, num_workers=0, image_size=64,
                             audio=AUDIO, persistent_workers=False)
    callbacks = METHODS[method]()
    diagnostics = Diagnostics(callbacks)
    epochs *= EPOCH_SCALE.get(method, 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[*callbacks, diagnostics],
                        default_root_dir=str(root.parent / "runs"))
    tic = time.perf_counter()
    trainer.fit(task, dm)
    seconds = time.perf_counter() - tic
    dm.setup("test")
    result = {"method": method, "seed": seed, "epochs": epochs, "seconds": seconds, **evaluate(task, dm, blank),
              "diagnostics": diagnostics.means()}
    print(json.dumps(result), flush=True)
    return result


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, backward(s), optimizer step), after ``skip`` warm-up batches."""

    def __init__(self, skip: int = 2) -> None:
        self.skip, self.times, self._tic = skip, [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._tic = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._tic)


def _timed_fit(method: str, root: Path, batch_size: int, lr: float, timer: L.Callback, limits: dict[str, int],
               unimodal: str = "zero", eval_batch_size: Optional[int] = None) -> Any:
    """One seeded fit of ``method`` with ``timer`` among its callbacks (no validation, no logging); returns it."""
    L.seed_everything(0, workers=True)
    task = AVETask(backbone=tiny_config(), head=HEAD, optim=OptimConfig(lr=lr, step_size=None),
                   unimodal=UnimodalConfig(mode=unimodal))
    dm = CachedAVEDataModule(str(root), batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=0,
                             image_size=64, audio=AUDIO, persistent_workers=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[*METHODS[method](), timer],
                        default_root_dir=str(root.parent / "runs"), **limits)
    trainer.fit(task, dm)
    return timer


def step_cost(root: Path, batch_size: int, lr: float, steps: int = 12) -> dict[str, float]:
    """Median training-step time of the baseline and of MMPareto (both with auxiliary heads), same batches."""
    out = {}
    for method in ("baseline_aux", "mmpareto_aux"):
        timer = _timed_fit(method, root, batch_size, lr, StepTimer(), {"max_steps": steps}, unimodal="aux")
        out[f"{method}_ms"] = round(1000 * statistics.median(timer.times), 1)
    out["ratio"] = round(out["mmpareto_aux_ms"] / out["baseline_aux_ms"], 2)
    return out


class EpochTimer(L.Callback):
    """Wall time of each training epoch, its end-of-epoch callbacks (D&R's feature pass) included: from one
    epoch's start to the next one's (the last: to the end of fit)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._tic: Optional[float] = None

    def _lap(self) -> None:
        now = time.perf_counter()
        if self._tic is not None:
            self.times.append(now - self._tic)
        self._tic = now

    def on_train_epoch_start(self, *args: Any) -> None:
        self._lap()

    def on_fit_end(self, *args: Any) -> None:
        self._lap()


def epoch_cost(root: Path, batch_size: int, lr: float, epochs: int = 3) -> dict[str, Any]:
    """Seconds per training epoch of the baseline and of D&R (``relearning``: feature pass and re-initialisation
    at the end of epochs 1 and 2), same batches; the extra seconds of D&R's epochs with a pass."""
    out: dict[str, Any] = {}
    for method in ("baseline", "relearning"):
        timer = _timed_fit(method, root, batch_size, lr, EpochTimer(), {"max_epochs": epochs}, eval_batch_size=16)
        out[f"{method}_s_per_epoch"] = [round(t, 2) for t in timer.times]
    base, relearn = out["baseline_s_per_epoch"], out["relearning_s_per_epoch"]
    # epoch 0 decodes the clips (memoised afterwards) and has no pass: compare epochs 1.. only
    out["pass_s"] = round(statistics.fmean(r - b for r, b in zip(relearn[1:], base[1:])), 2)
    out["ratio"] = round(statistics.fmean(relearn[1:]) / statistics.fmean(base[1:]), 2)
    return out


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({100 * min(values):.0f}..{100 * max(values):.0f})"


def table(results: list[dict[str, Any]], methods: list[str]) -> str:
    lines = ["| method | fused | audio only (weak) | visual only | fused, blank-picture clips | s / run |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        cols = [_stats([r[k] for r in rows]) for k in ("fused", "audio", "visual", "fused_blank")]
        seconds = statistics.fmean(r["seconds"] for r in rows)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cols) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def paired_table(results: list[dict[str, Any]], methods: list[str]) -> str:
    """Method minus baseline on the same seed (same initial weights and data order), in points."""
    base = {r["seed"]: r for r in results if r["method"] == "baseline"}
    lines = ["| method - baseline (same seed) | fused | audio only | visual only | fused, blank-picture clips |",
             "|---|---|---|---|---|"]
    for method in methods:
        rows = [r for r in results if r["method"] == method and r["seed"] in base]
        if method == "baseline" or not rows:
            continue
        cols = []
        for key in ("fused", "audio", "visual", "fused_blank"):
            diffs = [100 * (r[key] - base[r["seed"]][key]) for r in rows]
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            wins = sum(d > 0 for d in diffs)
            cols.append(f"{statistics.fmean(diffs):+.1f} ± {std:.1f} ({wins}/{len(diffs)} seeds up)")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


TABLE_HEADS = ("| method |", "| method - baseline")


def _table_rows(lines: list[str], head: str) -> tuple[int, int]:
    """``(start, end)`` line positions of the body rows of the table whose header starts with ``head``
    (``(-1, -1)`` if there is none)."""
    for i, line in enumerate(lines):
        if line.startswith(head):
            end = i + 2  # header, separator
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return i + 2, end
    return -1, -1


def _label(row: str) -> str:
    return row.split("|")[1].strip()


def merge_section(path: Path, body: str, note: str, title: str) -> list[str]:
    """Add this run (``body``: a fresh section) to the recorded ``## Balancing methods`` section.

    If every method of this run that the recorded tables also hold reproduces its recorded accuracies, the rows
    are merged: a method measured now replaces its recorded row (matched by its label in ``LABELS``), the rows
    of methods not run now are kept, rows are ordered as ``METHODS`` and ``note`` is added after the section's
    first paragraph. Otherwise (the code or the data changed since the recorded run: its rows are no longer
    comparable with this run's) the recorded tables are left as they are and this run's setup and tables go
    into their own subsection ``### title`` at the end of the section (replacing one of the same title, and
    what was written below it). The section's other text is kept; without a recorded section ``body`` is
    written as is. Returns a line per recorded row that this run does not reproduce.
    """
    text = path.read_text() if path.is_file() else ""
    start = text.find(SECTION)
    if start < 0:
        replace_section(SECTION, body, path)
        return []
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end
    lines, fresh = text[start:end].rstrip("\n").split("\n"), body.rstrip("\n").split("\n")
    changed = []
    for head in TABLE_HEADS:
        (new_start, new_end), (old_start, old_end) = _table_rows(fresh, head), _table_rows(lines, head)
        if new_start < 0 or old_start < 0:
            continue
        old_rows = {_label(r): r for r in lines[old_start:old_end]}
        changed += [f"{_label(row)}: recorded {old_rows[_label(row)]} -> now {row}" for row in fresh[new_start:new_end]
                    if _label(row) in old_rows and _cells(old_rows[_label(row)]) != _cells(row)]
    if changed:
        heading = f"### {title}"
        own = lines.index(heading) if heading in lines else -1
        if own >= 0:  # replace this run's earlier subsection (up to the next subsection or the section's end)
            after = next((i for i in range(own + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
            del lines[own - 1 if own > 0 and not lines[own - 1].strip() else own:after]
        first_table = next(i for i, line in enumerate(fresh) if line.startswith(TABLE_HEADS[0]))
        setup = [line for line in fresh[1:first_table] if line.strip()]  # this run's own setup paragraph
        lines += ["", heading, "", *setup, "", *fresh[first_table:]]
    else:
        order = {LABELS[m]: i for i, m in enumerate(METHODS)}
        for head in TABLE_HEADS:
            (new_start, new_end), (old_start, old_end) = _table_rows(fresh, head), _table_rows(lines, head)
            if new_start < 0:
                continue
            if old_start < 0:
                lines += ["", *fresh[new_start - 2:new_end]]
                continue
            merged = {**{_label(r): r for r in lines[old_start:old_end]},
                      **{_label(r): r for r in fresh[new_start:new_end]}}
            lines[old_start:old_end] = sorted(merged.values(), key=lambda r: order.get(_label(r), len(order)))
        paragraph = next((i for i, line in enumerate(lines) if i > 2 and not line.strip()), len(lines))
        lines[paragraph:paragraph] = ["", note]
    rest = text[end:]  # "\n## next section ..." or ""
    path.write_text(text[:start] + "\n".join(lines) + ("\n" + rest if rest else "\n"))
    return changed


def _cells(row: str) -> list[str]:
    """A table row's accuracy cells (not the seconds per run, which follow the machine's load)."""
    cells = [c.strip() for c in row.split("|")[1:-1]]
    return cells[:5] if len(cells) == 6 else cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/bench_imbalanced"))
    parser.add_argument("--methods", nargs="+", default=["baseline", "ogm_ge", "ogm", "opm", "valuation",
                                                         "baseline_aux", "ogm_ge_aux", "opm_aux", "baseline_2x"],
                        choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-test", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines of every run (default: <root>/../)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--step-cost", action="store_true",
                        help="only time training steps of the baseline and MMPareto (aux heads), and epochs of the "
                             "baseline and D&R, and print the ratios")
    parser.add_argument("--replace", action="store_true",
                        help="replace the whole BENCHMARKS.md section with this run's tables (default: merge this "
                             "run's rows into the recorded tables, keeping the rows of methods not run now)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: rebuild the table from every run in --results (e.g. after adding seeds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results_path = args.results or args.root.parent / "balance_results.jsonl"
    if args.step_cost:
        root = make_release(args.root, args.num_train, args.num_test)
        print(json.dumps(step_cost(root, args.batch_size, args.lr)), flush=True)
        print(json.dumps(epoch_cost(root, args.batch_size, args.lr)), flush=True)
        return
    if args.table_only:
        results = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
        args.seeds = sorted({r["seed"] for r in results})
        args.methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    else:
        root = make_release(args.root, args.num_train, args.num_test)
        blank = blank_clips(root)
        results = []
        for seed in args.seeds:
            for method in args.methods:
                result = run_one(method, seed, root, args.epochs, args.batch_size, args.lr, blank)
                results.append(result)
                with open(results_path, "a") as handle:
                    handle.write(json.dumps(result) + "\n")
    total = sum(r["seconds"] for r in results)
    body = report(results, args, total)
    print(body)
    if args.no_write:
        return
    if args.replace:
        replace_section(SECTION, body, HERE / "BENCHMARKS.md")
        return
    note = (f"Rows of {', '.join(args.methods)}: `bench/balance.py --methods {' '.join(args.methods)}` "
            f"({date.today().isoformat()}, {platform.machine()} CPU, {args.threads} torch thread(s), seeds "
            f"{' '.join(map(str, args.seeds))}, {total / 60:.1f} min of training; the paired rows of these methods "
            "are against this run's baseline).")
    title = f"Run of {date.today().isoformat()}: {', '.join(args.methods)}"
    for line in merge_section(HERE / "BENCHMARKS.md", body, note, title):
        print("not reproduced, so this run's tables go into their own subsection:", line)


def report(results: list[dict[str, Any]], args: argparse.Namespace, total: float) -> str:
    setup = (f"Script: `bench/balance.py` ({date.today().isoformat()}, {platform.machine()} CPU, "
             f"{args.threads} torch thread(s); {total / 60:.1f} min of training in all). Tiny AVMoE "
             f"(`tiny_config()`, random init, frozen encoders) + tiny CMBS head, Adam lr {args.lr}, "
             f"batch {args.batch_size}, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}. "
             f"Data: `write_imbalanced_ave_release` "
             f"(dominant visual, blank_fraction 0.25, weak_reliability 0.75, weak_contrast {WEAK_CONTRAST}; "
             f"{args.num_train} train / {args.num_test} test clips, 4 categories). Accuracies are AVE segment "
             f"accuracy on the test split in %, mean ± std over seeds (min..max).")
    paired = paired_table(results, args.methods) if "baseline" in args.methods else ""
    return f"{SECTION}\n\n{setup}\n\n{table(results, args.methods)}\n\n{paired}\n"


if __name__ == "__main__":
    main()
