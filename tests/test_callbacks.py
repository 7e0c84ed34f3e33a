"""Balancing callbacks: OGM-GE / OGM, OPM, sample-level modality valuation (single process).

Formulas against the authors' code (GeWu-Lab OGM-GE_CVPR2022, BML_TPAMI2024, Valuate-And-Enhance) (the 3.1 coefficient table, OPM's q, the 2-player Shapley values and
the re-sampling bands), then real Lightning fits of the tiny AVMoE on a generated imbalanced AVE release:
gradient edits, accumulation invariance, non-finite skipping, OPM's feature drop, valuation + re-sampling, and
exact continuation from a checkpoint. Multi-process checks live in ``test_callbacks_ddp.py``.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, DistributedSampler

import avmoe.callbacks.opm as opm_module
from avmoe.callbacks import OGM, OGMGE, OPM, ModalityValuation, ogm_coefficients, opm_drop_probabilities
from avmoe.callbacks._distributed import all_gather_rows, all_reduce_sum, dedup_by_index, mix_seed, shared_generator
from avmoe.callbacks.valuation import (
    modality_level_plan,
    sample_level_copies,
    sample_level_plan,
    shapley_contributions,
)
from avmoe.cli import cli_main
from avmoe.datamodules import AVEDataModule, LogMelConfig, collate
from avmoe.datamodules.synthetic.imbalanced import write_imbalanced_ave_release
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.presets import tiny_config
from avmoe.tasks.ave import AVETask
from avmoe.tasks.base import OptimConfig
from tests.helpers import CONFIGS

AUDIO = LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32, fmax=8000.0)
# No dropout anywhere: runs are then a deterministic function of weights, data order and the callbacks' seeds.
HEAD = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2,
                     dropout=0.0, proj_dropout=0.0)
NUM_TRAIN = 8


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def imbalanced_release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    return write_imbalanced_ave_release(root, num_train=NUM_TRAIN, num_val=2, num_test=2, num_categories=3,
                                        seed=0, size=64, fps=2)


class SeededAVEDataModule(AVEDataModule):
    """Train order from a seeded sampler keyed by the epoch (Lightning calls ``set_epoch``), so a resumed run
    sees the same batches as an uninterrupted one (a plain shuffled loader draws from the global RNG)."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)


def make_task(seed: int = 0, **adapter: Any) -> AVETask:
    torch.manual_seed(seed)
    backbone = tiny_config(adapter=adapter) if adapter else tiny_config()
    return AVETask(backbone=backbone, head=HEAD, optim=OptimConfig(lr=1e-2, step_size=None))


def make_datamodule(root: Path, batch_size: int = 4, seeded: bool = False) -> AVEDataModule:
    cls = SeededAVEDataModule if seeded else AVEDataModule
    return cls(str(root), batch_size=batch_size, num_workers=0, image_size=64, audio=AUDIO, persistent_workers=False)


def make_trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                    default_root_dir=str(root))
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


class GradSnapshot(Callback):
    """Clones the modality gradients in ``on_before_optimizer_step`` (put it before / after the callback under test)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, list[torch.Tensor]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = pl_module.modality_parameters()
        snap = {m: [p.grad.detach().clone() if p.grad is not None else None for p in ps] for m, ps in groups.items()}
        shared_ids = {id(p) for ps in groups.values() for p in ps}
        snap["other"] = [p.grad.detach().clone() for p in pl_module.parameters()
                         if p.grad is not None and id(p) not in shared_ids]
        self.steps.append(snap)


class StepLog(Callback):
    """Records ``callback.last`` after each optimizer step of the callback under test."""

    def __init__(self, watched: Any) -> None:
        self.watched = watched
        self.records: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.records.append(dict(self.watched.last))


# ------------------------------------------------------------------------------------------------ formulas
TABLE = [  # from OGM-GE_CVPR2022 main.py's coefficient: alpha, 1 - tanh(alpha * rho) at rho -> 1+ and at rho = 2
    (0.1, 0.90, 0.80), (0.3, 0.71, 0.46), (0.5, 0.54, 0.24), (0.8, 0.34, 0.08), (1.0, 0.24, 0.04), (2.6, 0.011, 0.0),
]


@pytest.mark.parametrize("alpha,at_one,at_two", TABLE)
def test_ogm_coefficient_table(alpha, at_one, at_two):
    tol = 0.0015 if at_one < 0.1 else 0.005  # the table is rounded to 2 (or 3) decimals
    k_a, k_v = ogm_coefficients(1.0, 1.0 + 1e-9, alpha)  # visual dominant, rho -> 1+
    assert k_a == 1.0 and k_v == pytest.approx(at_one, abs=tol)
    k_a, k_v = ogm_coefficients(2.0, 1.0, alpha)  # audio dominant, rho = 2
    assert k_v == 1.0 and k_a == pytest.approx(at_two, abs=0.005 if at_two else 1e-3)


def test_ogm_coefficient_jump_smooth_and_edges():
    alpha = 0.5
    below, above = ogm_coefficients(1.0, 1.0 - 1e-9, alpha), ogm_coefficients(1.0, 1.0 + 1e-9, alpha)
    assert below[1] == 1.0 and below[0] == pytest.approx(1 - math.tanh(alpha))  # audio dominant just below 1
    assert above[1] == pytest.approx(1 - math.tanh(alpha)), "official: jump to 1 - tanh(alpha) at rho = 1"
    assert ogm_coefficients(3.0, 3.0, alpha) == (1.0, 1.0), "tie: nothing modulated (Eq. 10)"
    smooth = ogm_coefficients(1.0, 1.0 + 1e-9, alpha, smooth=True)
    assert smooth[1] == pytest.approx(1.0, abs=1e-8), "smooth variant is continuous at rho = 1"
    assert ogm_coefficients(1.0, 3.0, alpha, smooth=True)[1] == pytest.approx(1 - math.tanh(alpha * 2))
    assert ogm_coefficients(0.0, 2.0, alpha) == (1.0, 0.0) and ogm_coefficients(0.0, 0.0, alpha) == (1.0, 1.0)
    k_a, k_v = ogm_coefficients(torch.tensor(4.0), torch.tensor(2.0), 1.0)
    assert isinstance(k_a, torch.Tensor) and float(k_a) == pytest.approx(1 - math.tanh(2.0)) and float(k_v) == 1.0


def test_ogm_windows_and_journal_defaults():
    ogm_ge = OGMGE(start_epoch=2, end_epoch=4)
    assert [ogm_ge.window.active(e) for e in range(6)] == [False, False, True, True, True, False], "inclusive"
    journal = OGM()
    assert journal.alpha == 0.8 and journal.noise, "train_ogm.sh runs the default OGM_GE"
    assert not journal.window.active(5) and journal.window.active(6), "TPAMI warm-up: epochs 0-5 unmodulated"
    assert journal.window.active(60) and not journal.window.active(61)


def test_opm_drop_probability():
    q_a, q_v = opm_drop_probabilities(3.0, 1.0, q_base=0.5, lam=0.5)  # rho_a = 3
    assert q_v == 0.0 and q_a == pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0)))
    assert opm_drop_probabilities(1.0, 1.0, 0.5, 0.5) == (0.0, 0.0), "tanh(relu(0)) = 0: no drop at a tie"
    assert opm_drop_probabilities(0.0, 1.0, 0.8, 1.0) == (0.0, 1.0), "clipped to 1"


def test_shapley_values_and_sample_level_bands():
    # Official discrete values: v(av) in {0, 2}, v(a), v(v) in {0, 1}.
    c_av, c_a, c_v = (torch.tensor(x, dtype=torch.float64) for x in ([1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0],
                                                                     [0, 0, 1, 0, 1, 1]))
    phi_a, phi_v = shapley_contributions(c_av, c_a, c_v)
    assert phi_a.tolist() == [1.5, 1.0, 1.0, 0.5, -0.5, 0.5]
    assert torch.equal(phi_a + phi_v, 2 * c_av), "efficiency: phi_a + phi_v = v(av)"
    assert sample_level_copies(np.array([1.5, 1.0, 0.5, 0.0, -0.5, 0.4, -0.1])).tolist() == [0, 0, 1, 2, 3, 0, 0]
    index = np.array([0, 1, 2])
    indices, audio_mask, visual_mask = sample_level_plan(index, np.array([1.5, 0.5, -0.5]),
                                                         np.array([0.5, 1.5, 0.0]), num_samples=4)
    assert indices.tolist() == [0, 1, 2, 3, 1, 2, 2, 2, 0, 2, 2]  # originals, audio-only, visual-only copies
    assert audio_mask.tolist() == [1] * 8 + [0] * 3 and visual_mask.tolist() == [1] * 4 + [0] * 4 + [1] * 3


def test_modality_level_plan_count_and_side():
    index = np.arange(10)
    phi_a, phi_v = np.full(10, 1.0), np.full(10, 0.1)  # gap_a 0, gap_v 0.9: visual lags
    indices, audio_mask, visual_mask = modality_level_plan(index, phi_a, phi_v, 10, part_ratio=0.2, alpha=1.0,
                                                           rng=np.random.default_rng(0))
    count = int(0.9 * 2 / 3 * 10)
    assert len(indices) == 10 + count and (audio_mask[10:] == 0).all() and (visual_mask == 1).all()
    again = modality_level_plan(index, phi_a, phi_v, 10, 0.2, 1.0, np.random.default_rng(0))
    assert np.array_equal(again[0], indices), "seeded: the same plan on every rank"


def test_distributed_helpers_single_process():
    index = torch.tensor([3, 1, 3, 0, 1])
    values = torch.tensor([30.0, 10.0, 99.0, 0.0, 98.0])
    unique, first = dedup_by_index(index, values)
    assert unique.tolist() == [0, 1, 3] and first.tolist() == [0.0, 10.0, 30.0], "first occurrence wins"
    assert torch.equal(all_reduce_sum(values), values)
    assert torch.equal(all_gather_rows(values[:, None]), values[:, None])
    assert mix_seed(0, 5) == mix_seed(0, 5) != mix_seed(0, 6)
    a, b = (torch.randn(4, generator=shared_generator("cpu", 1, 2)) for _ in range(2))
    assert torch.equal(a, b)


def test_ogm_modulate_scales_then_adds_noise_of_the_unmodulated_std():
    torch.manual_seed(0)
    g_a, g_v = torch.randn(64, 64) * 3.0, torch.randn(64, 64) * 0.5
    cb = OGMGE(alpha=1.0, noise=True, seed=7)
    grads = {"audio": [g_a.clone()], "visual": [g_v.clone()]}
    cb._modulate(grads, {"audio": 0.25, "visual": 1.0}, step=3)
    noise_a, noise_v = grads["audio"][0] - 0.25 * g_a, grads["visual"][0] - g_v
    assert noise_a.std().item() == pytest.approx(g_a.std().item(), rel=0.05), "sigma = std(g) before scaling"
    assert noise_v.std().item() == pytest.approx(g_v.std().item(), rel=0.05), "GE noise on the weak side too"
    again = {"audio": [g_a.clone()], "visual": [g_v.clone()]}
    cb._modulate(again, {"audio": 0.25, "visual": 1.0}, step=3)
    assert torch.equal(again["audio"][0], grads["audio"][0]), "noise is a function of (seed, step): rank-identical"
    other = {"audio": [g_a.clone()], "visual": [g_v.clone()]}
    cb._modulate(other, {"audio": 0.25, "visual": 1.0}, step=4)
    assert not torch.equal(other["audio"][0], grads["audio"][0])


def test_presets_append_to_a_task_config():
    presets = [CONFIGS / "callbacks" / f"{name}.yaml" for name in ("ogm_ge", "ogm", "opm", "valuation", "mmpareto",
                                                                   "relearning")]
    args = ["fit", "--config", str(CONFIGS / "ave.yaml")]
    for preset in presets:
        args += ["--config", str(preset)]
    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out), mock.patch("sys.argv", ["avmoe"]):
        cli_main([*args, "--print_config"])
    callbacks = [c["class_path"] for c in yaml.safe_load(out.getvalue())["trainer"]["callbacks"]]
    assert callbacks == ["lightning.pytorch.callbacks.EarlyStopping", "lightning.pytorch.callbacks.LearningRateMonitor",
                         "avmoe.callbacks.OGMGE", "avmoe.callbacks.OGM", "avmoe.callbacks.OPM",
                         "avmoe.callbacks.ModalityValuation", "avmoe.callbacks.MMPareto",
                         "avmoe.callbacks.Relearning"]


def test_imbalanced_release_is_read_by_the_ave_datamodule(imbalanced_release):
    """Picture (dominant): the class hue, gray on the blank clips. Sound (weak): the true tone only when reliable."""
    import librosa

    from avmoe.datamodules.synthetic.ave import class_colour, tone_frequency
    from avmoe.datamodules.synthetic.imbalanced import GRAY

    flags = {line.split(",")[0]: line.strip().split(",")[1:] for line in
             (imbalanced_release / "imbalance.csv").read_text().splitlines()[2:]}
    dm = make_datamodule(imbalanced_release)
    dm.setup("fit")
    ds = dm.dataset("train")
    hues = torch.tensor(np.stack([class_colour(k, 3) for k in range(3)]), dtype=torch.float32)
    centres = librosa.mel_frequencies(AUDIO.n_mels + 2, fmin=AUDIO.fmin, fmax=AUDIO.fmax)[1:-1]
    tone_bins = np.array([np.abs(centres - tone_frequency(k, 3, 16000)).argmin() for k in range(3)])
    shared = set(dm.dataset("test").video_ids)  # one VideoID carries a train row and a test row (official quirk)
    seen = {"blank": 0, "unreliable": 0}
    for i in range(len(ds)):
        sample = ds[i]
        label, (blank, reliable) = sample["label"], flags[sample["video_id"]]
        event = label < 28
        if not event.any() or sample["video_id"] in shared:
            continue
        colour = sample["video"][event].float().mean(dim=(0, 2, 3))  # (3,) mean RGB over event frames
        if blank == "1":
            assert (colour - GRAY).abs().max() < 8, (i, colour)
        else:
            assert int(torch.cdist(colour[None], hues).argmin()) == int(label[event][0]), (i, colour)
        peak_bin = int(sample["audio"][event].mean(dim=(0, 1)).argmax())  # loudest mel bin over event segments
        heard = int(np.abs(tone_bins - peak_bin).argmin())
        assert (heard == int(label[event][0])) == (reliable == "1"), (i, reliable, peak_bin, tone_bins)
        seen["blank"] += blank == "1"
        seen["unreliable"] += reliable == "0"
    assert seen["blank"] and seen["unreliable"], "the fixture should contain both kinds of corrupted clips"


# ------------------------------------------------------------------------------------------------ OGM in a fit
@pytest.mark.slow
def test_ogm_accumulation_invariant_and_scales_dominant_grads(imbalanced_release, tmp_path):
    """1 x batch 4 and 2 x batch 2 see the same samples before the first step: same ratio, same coefficient."""
    results = []
    for batch, accumulate in ((4, 1), (2, 2)):
        L.seed_everything(0)
        ogm = OGMGE(alpha=1.0, noise=False)
        before, after, log = GradSnapshot(), GradSnapshot(), None
        log = StepLog(ogm)
        trainer = make_trainer(tmp_path, [before, ogm, after, log], max_steps=1, accumulate_grad_batches=accumulate)
        trainer.fit(make_task(use_bn=False), make_datamodule(imbalanced_release, batch_size=batch))
        results.append((log.records[0], before.steps[0], after.steps[0]))
    (one, before, after), (two, _, _) = results
    assert one["active"] == 1.0 and not math.isnan(one["ratio_visual"])
    for key in ("ratio_visual", "k_audio", "k_visual", "score_audio", "score_visual"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    dominant = "visual" if one["ratio_visual"] > 1 else "audio"
    k = one[f"k_{dominant}"]
    assert k < 1.0
    for modality, coeff in (("audio", one["k_audio"]), ("visual", one["k_visual"])):
        for g0, g1 in zip(before[modality], after[modality]):
            if g0 is None:
                continue
            expected = g0 * coeff if g0.dim() >= 2 else g0  # biases / norm affines are not modulated
            torch.testing.assert_close(g1, expected)
    for g0, g1 in zip(before["other"], after["other"]):
        assert torch.equal(g0, g1), "cross-modal head layers belong to neither modality"


class PoisonGrad(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        audio = pl_module.modality_parameters()["audio"]
        next(p for p in audio if p.grad is not None and p.dim() >= 2).grad[0] = math.nan


@pytest.mark.slow
def test_ogm_skips_and_logs_nonfinite_steps(imbalanced_release, tmp_path):
    ogm = OGMGE(alpha=1.0, noise=True)
    before, after = GradSnapshot(), GradSnapshot()
    trainer = make_trainer(tmp_path, [PoisonGrad(), before, ogm, after], max_steps=1, limit_train_batches=1)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.fit(make_task(), make_datamodule(imbalanced_release, batch_size=2))
    assert ogm.num_skipped_nonfinite == 1 and ogm.num_modulated == 0
    assert ogm.last["skipped_nonfinite"] == 1.0 and trainer.callback_metrics["ogm/skipped_nonfinite"] == 1.0
    for modality in ("audio", "visual"):
        for g0, g1 in zip(before.steps[0][modality], after.steps[0][modality]):
            if g0 is not None:
                torch.testing.assert_close(g1, g0, equal_nan=True)


@pytest.mark.slow
def test_callbacks_run_under_bf16_autocast(imbalanced_release, tmp_path):
    """Probes run in the precision plugin's autocast (bf16 features meet an fp32 head); grads stay finite."""
    ogm, opm, val = OGMGE(alpha=1.0), OPM(p_exe=1.0, warmup_epochs=0), ModalityValuation(warmup_epochs=1, resample="modality")
    trainer = make_trainer(tmp_path, [ogm, opm, val], precision="bf16-mixed", max_epochs=1, limit_train_batches=2)
    task = make_task()
    trainer.fit(task, make_datamodule(imbalanced_release, batch_size=2))
    assert ogm.num_modulated == 2 and ogm.num_skipped_nonfinite == 0 and opm.num_calls == 2
    assert val.valued_epoch == 0 and len(val.table["index"]) == NUM_TRAIN
    assert all(torch.isfinite(p).all() for p in task.parameters())


# ------------------------------------------------------------------------------------------------ OPM
def _tensor_batch(task: AVETask, b: int = 6) -> dict[str, torch.Tensor]:
    cfg = task.backbone_config
    label = torch.full((b, 10), 28)
    label[:, 2:6] = 1
    return {"video": torch.randint(0, 255, (b, 10, 3, 64, 64), dtype=torch.uint8),
            "audio": torch.randn(b, 10, 101, cfg.audio.num_mel_bins), "audio_mask": torch.ones(b),
            "visual_mask": torch.ones(b), "index": torch.arange(b), "label": label}


def test_opm_hook_drops_the_dominant_modality_and_rescales(monkeypatch):
    task = make_task()
    batch = _tensor_batch(task)
    monkeypatch.setattr(opm_module, "unimodal_score_sums", lambda *a: torch.tensor([5.0, 1.0, 6.0]))
    opm = OPM(q_base=0.3, lam=0.5, p_exe=1.0, warmup_epochs=0)
    opm._trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    task.log = lambda *a, **k: None  # not attached to a running trainer
    task.eval()
    with torch.no_grad():
        plain = task.backbone(batch["video"], batch["audio"])
    task.train()
    out = opm._hook(task, plain, batch)
    q_a = 0.3 * (1 + 0.5 * math.tanh(4.0))
    assert opm.last["q_audio"] == pytest.approx(q_a) and opm.last["q_visual"] == 0.0 and opm.last["executed"] == 1.0
    d_a, d_v = plain.audio.shape[-1], plain.visual.shape[-1]
    scale = 1.0 / (1.0 - d_a * q_a / (d_a + d_v))
    dropped = out.audio.flatten(1).abs().sum(1) == 0
    assert 0 < dropped.sum() < len(dropped) and opm.last["dropped_audio"] == pytest.approx(dropped.float().mean())
    torch.testing.assert_close(out.audio[~dropped], plain.audio[~dropped] * scale)
    torch.testing.assert_close(out.visual, plain.visual * scale), "rescale applies to both modalities"
    task.eval()
    assert opm._hook(task, plain, batch) is plain, "training only"


class ZeroGradCheck(Callback):
    def __init__(self) -> None:
        self.backward_calls, self.max_grad = 0, None

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward_calls += 1
        self.max_grad = max(p.grad.abs().max().item() for p in pl_module.parameters() if p.grad is not None)


@pytest.mark.slow
def test_opm_fully_dropped_batch_runs_backward_with_zero_weight(imbalanced_release, tmp_path, monkeypatch):
    """Every sample already lacks vision (data plan) and OPM drops audio with q = 1: backward still runs, at 0."""
    monkeypatch.setattr(opm_module, "unimodal_score_sums", lambda *a: torch.tensor([5.0, 1.0, 2.0]))
    dm = make_datamodule(imbalanced_release, batch_size=2)
    dm.set_train_plan(np.arange(2), visual_mask=np.zeros(2))
    opm, check = OPM(q_base=1.0, lam=0.0, p_exe=1.0, keep_one_modality=False, warmup_epochs=0), ZeroGradCheck()
    task = make_task()
    start = {k: v.clone() for k, v in task.state_dict().items()}
    make_trainer(tmp_path, [opm, check], max_steps=1).fit(task, dm)
    assert opm.num_zero_weighted == 1 and opm.last["dropped_audio"] == 1.0
    assert check.backward_calls == 1 and check.max_grad == 0.0
    changed = [k for k, v in task.state_dict().items() if not torch.equal(v, start[k]) and v.is_floating_point()
               and "running" not in k]
    assert not changed, f"zero-weighted step changed {changed[:5]}"
    assert opm._hook not in task.feature_hooks, "unregistered after fit"


# ------------------------------------------------------------------------------------------------ valuation
class SeenSamples(Callback):
    def __init__(self) -> None:
        self.per_epoch: dict[int, list[tuple[int, float, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = zip(batch["index"].tolist(), batch["audio_mask"].tolist(), batch["visual_mask"].tolist())
        self.per_epoch.setdefault(trainer.current_epoch, []).extend(rows)


@pytest.mark.slow
def test_valuation_values_saves_logs_and_replans(imbalanced_release, tmp_path):
    val = ModalityValuation(resample="sample", warmup_epochs=1)
    seen = SeenSamples()
    task, dm = make_task(), make_datamodule(imbalanced_release, batch_size=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = make_trainer(tmp_path, [val, seen], max_epochs=2, logger=logger)
    trainer.fit(task, dm)
    saved = [np.load(tmp_path / "tb" / "valuation" / f"epoch_{e:03d}.npz") for e in (0, 1)]
    assert saved[0]["index"].tolist() == list(range(NUM_TRAIN))
    # Epoch 0's plan drove epoch 1: every original once, plus the uni-modal copies it asked for.
    plan = sample_level_plan(saved[0]["index"], saved[0]["phi_audio"], saved[0]["phi_visual"], NUM_TRAIN)
    expected = sorted(zip(plan[0].tolist(), plan[1].tolist(), plan[2].tolist()))
    assert sorted(seen.per_epoch[1]) == expected and len(expected) > NUM_TRAIN
    assert sorted(seen.per_epoch[0]) == [(i, 1.0, 1.0) for i in range(NUM_TRAIN)]
    # The epoch-1 table equals a manual valuation with the final weights.
    task.eval()
    with torch.no_grad():
        ds = dm.dataset("train")
        batch = collate([ds[i] for i in range(NUM_TRAIN)])
        feats = task.encode(batch)
        uni = task.unimodal_outputs(feats, batch)
        c = [task.sample_correct(o, batch).double() for o in (task.head_forward(feats, batch), uni["audio"],
                                                              uni["visual"])]
    phi_a, phi_v = shapley_contributions(*c)
    np.testing.assert_allclose(saved[1]["phi_audio"], phi_a.numpy(), atol=1e-6)
    np.testing.assert_allclose(saved[1]["phi_visual"], phi_v.numpy(), atol=1e-6)
    assert trainer.callback_metrics["valuation/phi_audio_mean"].item() == pytest.approx(float(phi_a.mean()), abs=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"valuation/phi_audio", "valuation/phi_visual"} <= set(events.Tags()["histograms"])


# ------------------------------------------------------------------------------------------------ resume
def _fit(root: Path, release: Path, epochs: int, ckpt: str | None = None) -> tuple[AVETask, list[Callback], Any]:
    callbacks = [OGMGE(alpha=1.0, noise=True), OPM(p_exe=1.0, q_base=0.5, warmup_epochs=0),
                 ModalityValuation(resample="sample", warmup_epochs=1)]
    # Saved at validation end, i.e. before the epoch-end valuation (the harder resume path; with the default
    # save-on-train-epoch-end the valuation state is already in the checkpoint).
    checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=1,
                                 save_on_train_epoch_end=False)
    task, dm = make_task(), make_datamodule(release, batch_size=4, seeded=True)
    trainer = make_trainer(root, [*callbacks, checkpoint], max_epochs=epochs, enable_checkpointing=True,
                           limit_val_batches=1)
    trainer.fit(task, dm, ckpt_path=ckpt)
    return task, callbacks, dm


@pytest.mark.slow
def test_resume_continues_identically(imbalanced_release, tmp_path):
    """2 epochs straight vs 1 epoch + resume from last.ckpt: same weights, same callback state, same plan."""
    straight, cbs_a, dm_a = _fit(tmp_path / "a", imbalanced_release, epochs=2)
    _fit(tmp_path / "b", imbalanced_release, epochs=1)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)["callbacks"]
    valuation_state = next(v for k, v in state.items() if k.startswith("ModalityValuation"))
    assert valuation_state["valued_epoch"] == -1, "saved at validation end, before the epoch-end valuation"
    assert any(k.startswith("OGMGE") and v["num_modulated"] == 2 for k, v in state.items())
    resumed, cbs_b, dm_b = _fit(tmp_path / "b", imbalanced_release, epochs=2, ckpt=str(last))
    for (name, p_a), p_b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p_b, p_a, rtol=1e-5, atol=1e-6, msg=name)
    assert len(dm_a.train_plan["indices"]) > NUM_TRAIN, "epoch 1 runs on a re-sampled set"
    assert cbs_b[0].num_modulated == cbs_a[0].num_modulated > 4
    assert cbs_b[1].num_calls == cbs_a[1].num_calls and cbs_b[1].num_executed == cbs_a[1].num_executed
    assert cbs_b[2].valued_epoch == cbs_a[2].valued_epoch == 1
    for key in ("indices", "audio_mask", "visual_mask"):
        np.testing.assert_array_equal(dm_b.train_plan[key], dm_a.train_plan[key])
