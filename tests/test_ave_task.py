"""AVE task pieces: labels -> losses, the official prediction rule, the metric, the modality contract."""

from __future__ import annotations

import pytest
import torch

from avmoe.metrics.ave import BACKGROUND, AVESegmentAccuracy, ave_segment_accuracy, ave_segment_predictions
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.presets import tiny_config
from avmoe.tasks.ave import AVETask, video_class
from avmoe.tasks.base import OptimConfig

TINY_HEAD = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2)


@pytest.fixture(scope="module")
def task() -> AVETask:
    torch.manual_seed(0)
    return AVETask(backbone=tiny_config(), head=TINY_HEAD, optim=OptimConfig())


def tiny_batch(task: AVETask, b: int = 2, t: int = 10) -> dict:
    cfg = task.backbone_config
    size, mels = cfg.visual.image_size, cfg.audio.num_mel_bins
    label = torch.full((b, t), BACKGROUND)
    label[0, 2:6] = 1
    return {
        "video": torch.randint(0, 255, (b, t, 3, size, size), dtype=torch.uint8),
        "audio": torch.randn(b, t, 101, mels),
        "audio_mask": torch.ones(b), "visual_mask": torch.ones(b),
        "index": torch.arange(b), "label": label,
    }


def test_video_class_and_background_only_clips():
    label = torch.tensor([[28, 3, 3, 28], [28, 28, 28, 28]])
    cls, has = video_class(label)
    assert cls.tolist()[0] == 3 and has.tolist() == [True, False]


def test_prediction_rule_thresholds_is_event():
    is_event = torch.tensor([[5.0, -5.0, 0.0]])  # sigmoid(0) = 0.5 is NOT > 0.5
    scores = torch.zeros(1, 28)
    scores[0, 7] = 1.0
    assert ave_segment_predictions(is_event, scores).tolist() == [[7, BACKGROUND, BACKGROUND]]
    assert ave_segment_accuracy(torch.tensor([[7, 28, 1]]), torch.tensor([[7, 28, 28]])) == pytest.approx(2 / 3)


def test_metric_counts_each_sample_once():
    """DistributedSampler padding repeats samples: the metric must not count them twice."""
    m = AVESegmentAccuracy()
    pred = torch.tensor([[1, 1], [2, 2]])
    target = torch.tensor([[1, 1], [2, 0]])
    m.update(torch.tensor([0, 1]), pred, target)
    m.update(torch.tensor([1]), pred[1:], target[1:])  # index 1 again (padding)
    assert m.compute()["acc"].item() == pytest.approx(3 / 4)


def test_losses_backward_reach_adapters_and_head_only(task):
    batch = tiny_batch(task)
    task.train()
    _, out = task(batch)
    assert out["is_event"].shape == (2, 10) and out["event_scores"].shape == (2, 28)
    losses = task.compute_losses(out, batch)
    assert set(losses) == {"loss_event", "loss_class", "loss_av"}
    task.zero_grad()
    torch.stack(list(losses.values())).sum().backward()
    frozen = [p for p in task.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.head.parameters())


def test_modality_contract(task):
    groups = task.modality_parameters()
    audio, visual = {id(p) for p in groups["audio"]}, {id(p) for p in groups["visual"]}
    assert audio and visual and not audio & visual
    assert {id(p) for p in task.head.a_cas.parameters()} <= audio
    assert {id(p) for p in task.head.v_cas.parameters()} <= visual
    batch = tiny_batch(task)
    task.eval()
    with torch.no_grad():
        feats, fused = task(batch)
        uni = task.unimodal_outputs(feats, batch)
        scores = task.sample_scores(fused, batch)
    assert set(uni) == {"audio", "visual"}
    assert not torch.allclose(uni["audio"]["event_scores"], uni["visual"]["event_scores"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_modality_masks_zero_features(task):
    batch = tiny_batch(task)
    batch["audio_mask"] = torch.tensor([0.0, 1.0])
    task.eval()
    with torch.no_grad():
        feats = task.encode(batch)
    assert feats.audio[0].abs().sum() == 0 and feats.audio[1].abs().sum() > 0
    assert feats.visual[0].abs().sum() > 0


def test_checkpoints_omit_frozen_pretrained_encoders(tmp_path):
    """Encoders loaded from local weights are not copied into every checkpoint, and reload strictly."""
    from avmoe.models.backbones import htsat, swin

    cfg = tiny_config()
    swin.build_swin(cfg.visual).save_pretrained(tmp_path / "swin")
    htsat.build_htsat(cfg.audio).save_pretrained(tmp_path / "htsat")
    cfg = tiny_config(visual={"pretrained": str(tmp_path / "swin")}, audio={"pretrained": str(tmp_path / "htsat")})
    task = AVETask(backbone=cfg, head=TINY_HEAD)
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    assert not any(k.startswith("backbone.visual_encoder.") for k in ckpt["state_dict"])
    assert any(k.startswith("backbone.adapters") or ".adapter" in k for k in ckpt["state_dict"])
    fresh = AVETask(backbone=cfg, head=TINY_HEAD)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    for (k, a), b in zip(task.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
