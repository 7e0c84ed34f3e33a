"""Audio mixup (official AVVP/AVS/AVQA training recipe) as a backbone option."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avmoe.models.avmoe import AVMoEBackbone
from avmoe.models.mixup import mix_log_mel, mixup_partner_index
from avmoe.models.presets import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")


def official_do_mixup(x: torch.Tensor, mixup_lambda: torch.Tensor) -> torch.Tensor:
    """HTS-AT ``utils.py::do_mixup``: each item with the batch-reversed one."""
    return (x.transpose(0, -1) * mixup_lambda + torch.flip(x, dims=[0]).transpose(0, -1) * (1 - mixup_lambda)
            ).transpose(0, -1)


def test_partner_indices():
    assert mixup_partner_index(1, 4, "frames").tolist() == [3, 2, 1, 0]  # batch 1: segment t meets T-1-t
    assert mixup_partner_index(2, 3, "frames").tolist() == [5, 4, 3, 2, 1, 0]
    assert mixup_partner_index(2, 3, "clips").tolist() == [3, 4, 5, 0, 1, 2]  # same segment, other clip
    assert mixup_partner_index(1, 3, "clips").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="partner"):
        mixup_partner_index(1, 3, "pairs")


def test_frames_mixup_equals_the_official_do_mixup():
    audio = torch.randn(2, 5, 11, 8)  # (B, T, F, n_mels)
    mixed, lam = mix_log_mel(audio, 0.5, "frames")
    assert lam.shape == (2, 5) and ((lam >= 0) & (lam <= 1)).all() and lam.std() > 0
    expected = official_do_mixup(audio.reshape(10, 11, 8), lam.reshape(10))
    torch.testing.assert_close(mixed.reshape(10, 11, 8), expected)
    clips, lam = mix_log_mel(audio, 0.5, "clips")
    torch.testing.assert_close(clips[0, 2], lam[0, 2] * audio[0, 2] + (1 - lam[0, 2]) * audio[1, 2])


def test_backbone_mixes_audio_in_training_only():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg = replace(cfg, audio=replace(cfg.audio, mixup_alpha=0.5))
    mixing = AVMoEBackbone(cfg)
    plain = AVMoEBackbone(replace(cfg, audio=replace(cfg.audio, mixup_alpha=0.0)))
    plain.load_state_dict(mixing.state_dict())
    size, mels = cfg.visual.image_size, cfg.audio.num_mel_bins
    video = torch.randint(0, 255, (2, 3, 3, size, size), dtype=torch.uint8)
    audio = torch.randn(2, 3, 101, mels)
    with torch.no_grad():
        mixing.eval(), plain.eval()
        torch.testing.assert_close(mixing(video, audio).audio, plain(video, audio).audio)  # eval: never mixed
        mixing.train(), plain.train()
        torch.manual_seed(1)
        trained = mixing(video, audio).audio
        torch.manual_seed(1)
        by_hand, _ = mix_log_mel(audio, 0.5, "frames")  # the same draw, then no further mixing
        torch.testing.assert_close(trained, plain(video, by_hand).audio)
        assert not torch.allclose(trained, plain(video, audio).audio)
