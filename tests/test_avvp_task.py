"""AVVP task: the MGN head's outputs, the official losses (visual label smoothing, class tokens, load balancing),
the modality contract, per-sample scores, and fit + test through the real CLI on a synthetic LLP release."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avmoe.cli import cli_main
from avmoe.metrics.avvp import METRIC_NAMES, avvp_summary, avvp_video_scores
from avmoe.models.heads.avvp import AVVPHeadConfig, MGNHead
from avmoe.models.presets import paper_adapter, tiny_config
from avmoe.tasks.avvp import AVVPLossConfig, AVVPTask, clamped_bce
from avmoe.tasks.base import OptimConfig
from tests.helpers import CONFIGS, one_thread

TINY_HEAD = AVVPHeadConfig(dim=32, num_heads=4, depth_audio=1, depth_visual=1, depth_av=1, drop_path=0.0)


def tiny_avvp_backbone():
    """tiny_config() with the official AVVP adapter structure (param-free UA, every stage, LB x1.0)."""
    adapter = paper_adapter("avvp")
    adapter.num_latents, adapter.reduction, adapter.router_hidden = 4, 4, [16, 8]
    return tiny_config(adapter=adapter)


@pytest.fixture(scope="module")
def task() -> AVVPTask:
    torch.manual_seed(0)
    return AVVPTask(backbone=tiny_avvp_backbone(), head=TINY_HEAD, optim=OptimConfig())


def tiny_batch(task: AVVPTask, b: int = 2) -> dict:
    cfg = task.backbone_config
    size, mels = cfg.visual.image_size, cfg.audio.num_mel_bins
    labels = torch.zeros(b, 25)
    labels[0, [0, 3]] = 1
    labels[1, 7] = 1
    return {
        "video": torch.randint(0, 255, (b, 10, 3, size, size), dtype=torch.uint8),
        "audio": torch.randn(b, 10, 101, mels),
        "audio_mask": torch.ones(b), "visual_mask": torch.ones(b),
        "index": torch.arange(b), "labels": labels,
        "gt_audio": torch.zeros(b, 25, 10), "gt_visual": torch.zeros(b, 25, 10),
    }


def test_head_outputs_and_segment_probabilities(task):
    task.eval()
    with torch.no_grad():
        _, out = task(tiny_batch(task))
    assert out["global_prob"].shape == (2, 25) and out["audio_seg_prob"].shape == (2, 25, 10)
    assert out["audio_cls_logits"].shape == (25, 25)
    for side in ("audio", "visual"):
        prob, seg = out[f"{side}_prob"], out[f"{side}_seg_prob"]
        assert ((prob > 0) & (prob < 1)).all()
        # Official segment weights (segment_weights="official", soft assignment): 1 + softmax over the segments.
        torch.testing.assert_close((seg / prob.unsqueeze(-1) - 1).sum(-1), torch.ones(2, 25))


def test_official_losses_with_visual_label_smoothing(task):
    batch = tiny_batch(task)
    task.eval()
    with torch.no_grad():
        _, out = task(batch)
        losses = task.compute_losses(out, batch)
    y = batch["labels"]
    assert set(losses) == {"loss_global", "loss_audio", "loss_visual", "loss_cls_audio", "loss_cls_visual"}
    torch.testing.assert_close(losses["loss_visual"], F.binary_cross_entropy(out["visual_prob"], 0.9 * y + 0.05))
    torch.testing.assert_close(losses["loss_audio"], F.binary_cross_entropy(out["audio_prob"], y))
    # Zero-initialised class tokens: uniform class-token logits, CE = log 25.
    assert losses["loss_cls_audio"].item() == pytest.approx(np.log(25), abs=1e-5)
    # Probabilities are clamped to [1e-7, 1 - 1e-7] in float32, as official (else BCE would hit torch's 100 cap).
    worst = -(np.log(np.float32(1e-7)) + np.log(1 - np.float32(1 - 1e-7))) / 2
    assert clamped_bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(worst, rel=1e-5)
    assert set(AVVPTask(backbone=tiny_avvp_backbone(), head=TINY_HEAD,
                        loss=AVVPLossConfig(class_token_weight=0.0)).compute_losses(out, batch)) == {
        "loss_global", "loss_audio", "loss_visual"}


def test_training_step_adds_load_balancing_and_trains_adapters_and_head_only(task):
    batch = tiny_batch(task)
    task.train()
    task.zero_grad()
    feats, out = task(batch)
    assert feats.aux_loss.item() > 0  # KL(uniform || mean routing) summed over 48 MoE modules, weight 1.0
    with mock.patch.object(task, "log"):
        loss = task.training_step(batch, 0)
    expected = sum(task.compute_losses(out, batch).values()) + feats.aux_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)  # drop path is 0: same forward twice
    loss.backward()
    frozen = [p for p in task.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert task.head.audio_token.weight.grad.abs().sum() > 0
    adapters = [p for p in task.backbone.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_modality_contract(task):
    groups = task.modality_parameters()
    audio, visual = {id(p) for p in groups["audio"]}, {id(p) for p in groups["visual"]}
    assert audio and visual and not audio & visual
    assert id(task.head.audio_token.weight) in audio and id(task.head.visual_token.weight) in visual
    assert {id(p) for p in task.head.audio_cug.parameters()} <= audio
    assert not {id(p) for p in task.head.av_mcg.parameters()} & (audio | visual)
    task.eval()
    with torch.no_grad():
        feats, _ = task(tiny_batch(task))
        uni = task.unimodal_outputs(feats, tiny_batch(task))
    assert set(uni) == {"audio", "visual"} and uni["audio"]["global_prob"].shape == (2, 25)


def test_sample_scores_and_correctness(task):
    batch = tiny_batch(task)
    good = {"global_prob": batch["labels"] * 0.98 + 0.01}
    bad = {"global_prob": 0.99 - batch["labels"] * 0.98}
    assert (task.sample_scores(good, batch) > 0.95).all() and (task.sample_scores(bad, batch) < 0.1).all()
    assert task.sample_correct(good, batch).tolist() == [1.0, 1.0]
    half = {"global_prob": torch.zeros(2, 25)}
    half["global_prob"][0, 0] = 0.9  # one of the two true labels of video 0
    assert task.sample_correct(half, batch).tolist() == [0.5, 0.0]


def test_mmil_baseline_head_has_the_same_outputs_without_class_tokens():
    torch.manual_seed(0)
    mmil = AVVPTask(backbone=tiny_avvp_backbone(), head=AVVPHeadConfig(arch="mmil", dim=32, num_heads=1))
    batch = tiny_batch(mmil)
    mmil.eval()
    with torch.no_grad():
        _, out = mmil(batch)
    assert set(out) == {"global_prob", "audio_prob", "visual_prob", "audio_seg_prob", "visual_seg_prob"}
    assert out["visual_seg_prob"].shape == (2, 25, 10) and ((out["global_prob"] > 0) & (out["global_prob"] < 1)).all()
    assert set(mmil.compute_losses(out, batch)) == {"loss_global", "loss_audio", "loss_visual"}
    groups = mmil.modality_parameters()
    assert {id(p) for p in mmil.head.fc_a.parameters()} <= {id(p) for p in groups["audio"]}
    assert {id(p) for p in mmil.head.fc_v.parameters()} <= {id(p) for p in groups["visual"]}


def _separable_clips(n: int, protos: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, 10, D) with 1-2 of the first 3 classes present, each as its prototype added on 4 segments."""
    y, x = torch.zeros(n, 25), torch.randn(n, 10, protos.shape[1], generator=g) * 0.3
    for i in range(n):
        for c in torch.randperm(3, generator=g)[: int(torch.randint(1, 3, (), generator=g))]:
            start = int(torch.randint(0, 7, (), generator=g))
            y[i, c] = 1
            x[i, start:start + 4] += protos[c]
    return x, y


def test_mgn_head_learns_video_labels_from_separable_features():
    """MGN trains: with the official losses on features that carry the classes, the video-level labels are
    learnt within 150 steps (the class-token grouping is not stuck at its zero initialisation)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = MGNHead(32, 32, TINY_HEAD)
    protos = torch.randn(25, 32, generator=g) * 2
    ids = torch.arange(25)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def accuracy() -> float:
        head.eval()
        with torch.no_grad():
            x, y = _separable_clips(64, protos, g)
            prob = head(x, x)["global_prob"]
        head.train()
        return ((prob >= 0.5) == (y > 0)).float()[:, :3].mean().item()

    before = accuracy()
    for _ in range(150):
        x, y = _separable_clips(16, protos, g)
        out = head(x, x)
        loss = (clamped_bce(out["global_prob"], y) + clamped_bce(out["audio_prob"], y)
                + clamped_bce(out["visual_prob"], 0.9 * y + 0.05)
                + F.cross_entropy(out["audio_cls_logits"], ids) + F.cross_entropy(out["visual_cls_logits"], ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after >= 0.95 and after > before + 0.2, (before, after)


def test_mgn_spatio_temporal_stream():
    from avmoe.models.heads.avvp import MGNHead

    head = MGNHead(32, 16, AVVPHeadConfig(dim=16, num_heads=2, depth_audio=1, depth_visual=1, depth_av=1, st_dim=8))
    out = head(torch.randn(2, 10, 32), torch.randn(2, 10, 16), torch.randn(2, 10, 8))
    assert out["visual_seg_prob"].shape == (2, 25, 10)
    assert head.fc_st in head.modality_modules()["visual"]
    with pytest.raises(ValueError, match="no 'visual_st' features"):
        head(torch.randn(2, 10, 32), torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match="built for 10 segments"):
        head(torch.randn(2, 5, 32), torch.randn(2, 5, 16), torch.randn(2, 5, 8))


def test_metric_needs_dense_ground_truth(task):
    batch = tiny_batch(task)
    del batch["gt_audio"]
    with pytest.raises(KeyError, match="gt_audio"):
        task.update_metric(task.make_metric(), {}, batch)


# ------------------------------------------------------------------------------------------- end to end


def _baseline(root: Path) -> dict[str, float]:
    """Trivial parsers on the test split, best of: nothing; every class of the release everywhere; the most
    frequent training class everywhere (both modalities)."""
    from avmoe.datamodules.llp import LLPDataModule

    dm = LLPDataModule(str(root), num_workers=0)
    test, train = dm.dataset("test"), dm.dataset("train")
    gt_a, gt_v = (torch.from_numpy(g.astype(np.float32)) for g in (test.gt_audio, test.gt_visual))
    present = torch.from_numpy(train.labels.sum(0) > 0)
    candidates = [torch.zeros(25, dtype=torch.bool), present,
                  torch.nn.functional.one_hot(torch.tensor(int(train.labels.sum(0).argmax())), 25).bool()]
    best: dict[str, float] = {}
    for classes in candidates:
        pred = classes.float().view(1, 25, 1).expand_as(gt_a)
        summary = avvp_summary(avvp_video_scores(pred, pred, gt_a, gt_v))
        best = {k: max(best.get(k, 0.0), v.item()) for k, v in summary.items()}
    return best


@pytest.mark.slow
def test_fit_and_test_through_the_cli_learn_well_above_trivial(in_tmp):
    """demo_avvp.yaml (tiny backbone, MMIL head) on a synthetic release. The adapters are switched off here to keep
    the run within a CPU minute (the frozen backbone then needs no backward); adapter training with the
    load-balancing loss is covered by the unit test above."""
    from avmoe.datamodules.synthetic.llp import write_llp_release

    root = write_llp_release(in_tmp / "llp", num_train=48, num_val=6, num_test=12, num_categories=3, seed=1)
    args = [
        "fit", "--config", str(CONFIGS / "demo_avvp.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.num_workers=0", f"--run.root={in_tmp / 'runs'}",
        "--run.name=avvp", "--trainer.max_epochs=8", "--trainer.enable_progress_bar=false",
        "--model.init_args.backbone.adapter.enabled=false",
    ]
    with one_thread(), mock.patch("sys.argv", ["avmoe"]):
        cli_main(args)
    result = json.loads((in_tmp / "runs" / "avvp" / "metrics" / "test.json").read_text())["metrics"]
    assert {f"test/{name}" for name in METRIC_NAMES} <= set(result)
    assert all(0.0 <= result[f"test/{name}"] <= 1.0 for name in METRIC_NAMES)
    baseline = _baseline(root)
    for name in ("segment_type", "segment_event", "event_type", "event_event"):
        assert result[f"test/{name}"] > baseline[name] + 0.15, (name, result, baseline)
