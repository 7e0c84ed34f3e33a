"""Robustness evaluation pieces: corruptions, missing modalities and attacks (pure functions), then on a task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from avmoe.datamodules.audio import SAMPLE_INDEX, LogMel, LogMelConfig
from avmoe.robustness.attacks import joint_norms, l2_attack, sample_norms
from avmoe.robustness.corruptions import (LOWPASS_CUTOFFS, NOISE_SNRS, OCCLUSION_AREAS, VISUAL_CORRUPTIONS,
                                          clip_generator, corrupt_audio, corrupt_video, snr_db)
from avmoe.robustness.setting import (EvalSetting, WaveCorruption, apply_setting, drop_modalities, missing_masks,
                                      silence_db)
from avmoe.robustness.sweep import RobustnessConfig, SweepItem
from tests.helpers import ave_batch

SR = 32000


def _wave(seed: int = 0, seconds: float = 2.0) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(len(t), generator=g)).view(2, -1)


def _frames(seed: int = 0, size: int = 64) -> torch.Tensor:
    """Smooth textured frames (T=3): blur and JPEG change them measurably, unlike flat colour."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, 3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    fine = 0.25 * torch.rand(3, 3, size, size, generator=g)
    return ((0.75 * up + fine).clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------- audio
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_white_noise_hits_the_target_snr_and_is_seeded(severity):
    wave = _wave()
    noisy = corrupt_audio(wave, "white_noise", severity, clip_generator(0, 7, "audio"), SR)
    assert snr_db(wave, noisy) == pytest.approx(NOISE_SNRS[severity - 1], abs=1e-3)  # measured on the output
    again = corrupt_audio(wave, "white_noise", severity, clip_generator(0, 7, "audio"), SR)
    other = corrupt_audio(wave, "white_noise", severity, clip_generator(0, 8, "audio"), SR)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)  # a function of (seed, index)
    assert snr_db(wave, corrupt_audio(wave, "white_noise", 1, clip_generator(0, 7, "audio"), SR, snr=13.0)) == \
        pytest.approx(13.0, abs=1e-3)


def test_lowpass_removes_more_high_frequency_energy_with_severity():
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(1, SR, generator=g)  # white: energy at every frequency
    freqs = np.fft.rfftfreq(SR, 1 / SR)
    residual = []
    for severity in range(1, 6):
        out = corrupt_audio(wave, "lowpass", severity, clip_generator(0, 0, "audio"), SR)
        spec = np.abs(np.fft.rfft(out[0].numpy())) ** 2
        cutoff = LOWPASS_CUTOFFS[severity - 1]
        band = freqs > 1.5 * cutoff
        above = spec[band].sum() / (np.abs(np.fft.rfft(wave[0].numpy())) ** 2)[band].sum()
        assert above < 1e-2  # 6th order: 1 / (1 + 1.5^12), > 20 dB down at 1.5 x the cutoff
        residual.append(float(out.pow(2).sum()))
    assert residual == sorted(residual, reverse=True)  # lower cutoff, less energy left


def test_wave_corruption_acts_inside_the_logmel_front_end_by_sample_index():
    logmel = LogMel(LogMelConfig(n_mels=16))
    wave = _wave(seconds=2.0).reshape(-1).numpy()
    clean = logmel(wave, 2)
    setting = EvalSetting(audio_corruption="white_noise", severity=5)
    logmel.wave_transform = WaveCorruption(setting, SR)
    token = SAMPLE_INDEX.set(3)
    try:
        noisy = logmel(wave, 2)
        again = logmel(wave, 2)
    finally:
        SAMPLE_INDEX.reset(token)
    expected = LogMel(LogMelConfig(n_mels=16))(
        corrupt_audio(torch.from_numpy(wave).view(2, -1), "white_noise", 5, clip_generator(0, 3, "audio"), SR)
        .reshape(-1).numpy(), 2)
    np.testing.assert_allclose(noisy, expected, atol=1e-4)  # the waveform was corrupted, then the log-mel taken
    assert np.array_equal(noisy, again) and np.abs(noisy - clean).mean() > 1.0


# ---------------------------------------------------------------------------------------------------- video
@pytest.mark.parametrize("name", VISUAL_CORRUPTIONS)
def test_visual_corruptions_are_seeded_and_monotone_in_severity(name):
    frames = _frames()
    distances = []
    for severity in range(1, 6):
        out = corrupt_video(frames, name, severity, clip_generator(0, 5, "visual"))
        again = corrupt_video(frames, name, severity, clip_generator(0, 5, "visual"))
        assert out.dtype == torch.uint8 and out.shape == frames.shape and torch.equal(out, again)
        distances.append(float((out.float() - frames.float()).pow(2).mean()))
    assert all(a < b for a, b in zip(distances, distances[1:])), (name, distances)


def test_occlusion_erases_the_severity_area_on_every_frame():
    frames = _frames().clamp(min=1)  # no natural zeros
    for severity, area in enumerate(OCCLUSION_AREAS, start=1):
        out = corrupt_video(frames, "occlusion", severity, clip_generator(1, 2, "visual"))
        erased = (out == 0).all(1)  # (T, H, W)
        assert torch.equal(erased[0], erased[1]) and torch.equal(erased[0], erased[2])  # one draw per clip
        assert float(erased[0].float().mean()) == pytest.approx(area, abs=0.03)


def test_contrast_shrinks_the_spread():
    frames = _frames()
    stds = [float(corrupt_video(frames, "contrast", s, None).float().std()) for s in range(1, 6)]
    assert stds == sorted(stds, reverse=True) and stds[-1] < 0.1 * float(frames.float().std())


# --------------------------------------------------------------------------------------------------- missing
def test_missing_selection_depends_on_the_sample_index_only():
    setting = EvalSetting(missing="audio", missing_rate=0.3, seed=4)
    idx = torch.arange(2000)
    masks = missing_masks(setting, idx, 10)["audio"]
    assert abs(float(masks[:, 0].float().mean()) - 0.3) < 0.04
    assert (masks == masks[:, :1]).all()  # whole clips
    perm = torch.randperm(2000)
    assert torch.equal(missing_masks(setting, idx[perm], 10)["audio"], masks[perm])  # batch order is irrelevant
    other = missing_masks(EvalSetting(missing="audio", missing_rate=0.3, seed=5), idx, 10)["audio"]
    assert not torch.equal(other, masks)
    seg = missing_masks(EvalSetting(missing="either", missing_segment_p=0.5), idx[:200], 10)
    assert not (seg["audio"] & seg["visual"]).any()
    assert abs(float((seg["audio"] | seg["visual"]).float().mean()) - 0.5) < 0.05
    assert not (seg["audio"] == seg["audio"][:, :1]).all()  # per segment, not per clip


def _batch(b: int = 4, t: int = 10, size: int = 16, mels: int = 8) -> dict:
    return {"video": torch.randint(1, 255, (b, t, 3, size, size), dtype=torch.uint8),
            "audio": torch.randn(b, t, 11, mels), "audio_mask": torch.ones(b), "visual_mask": torch.ones(b),
            "index": torch.arange(10, 10 + b)}


def test_missing_fills_remove_the_modality():
    batch = _batch()
    audio = drop_modalities(EvalSetting(missing="audio", missing_rate=1.0), batch)
    assert (audio["audio"] == silence_db()).all() and torch.equal(audio["video"], batch["video"])
    visual = drop_modalities(EvalSetting(missing="visual", missing_rate=1.0), batch)
    assert (visual["video"] == 0).all() and torch.equal(visual["audio"], batch["audio"])
    feats = drop_modalities(EvalSetting(missing="visual", missing_rate=1.0, missing_fill="features"), batch)
    assert (feats["visual_mask"] == 0).all() and (feats["audio_mask"] == 1).all()
    assert torch.equal(feats["video"], batch["video"])
    seg = EvalSetting(missing="audio", missing_segment_p=0.5)
    out = drop_modalities(seg, batch)
    hit = missing_masks(seg, batch["index"], 10)["audio"]
    assert (out["audio"][hit] == silence_db()).all() and torch.equal(out["audio"][~hit], batch["audio"][~hit])
    with pytest.raises(ValueError, match="per-segment"):
        EvalSetting(missing="audio", missing_segment_p=0.5, missing_fill="features")


# --------------------------------------------------------------------------------------------------- attacks
class _Toy(nn.Module):
    """A small nonlinear two-input classifier: the attack objective."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.v = nn.Linear(12, 8), nn.Linear(20, 8)
        self.out = nn.Linear(8, 3)

    def loss(self, x: dict, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x["audio"].flatten(1)) + self.v(x["visual"].flatten(1)))
        return nn.functional.cross_entropy(self.out(h), y)


@pytest.mark.parametrize("method", ["fgm", "pgd_l2"])
@pytest.mark.parametrize("joint", [True, False])
def test_attacks_stay_in_their_ball_clamp_and_raise_the_loss(method, joint):
    toy = _Toy()
    g = torch.Generator().manual_seed(1)
    x = {"audio": torch.randn(6, 3, 4, generator=g), "visual": torch.rand(6, 4, 5, generator=g)}
    y = torch.arange(6) % 3
    eps = {"audio": 0.5, "visual": 0.5} if joint else {"audio": 0.4, "visual": 0.7}
    clamp = {"visual": lambda z: z.clamp(0, 1)}
    adv = l2_attack(lambda a: toy.loss(a, y), x, eps, method=method, joint=joint, clamp=clamp)
    again = l2_attack(lambda a: toy.loss(a, y), x, eps, method=method, joint=joint, clamp=clamp)
    assert all(torch.equal(adv[m], again[m]) for m in adv)  # deterministic
    delta = {m: adv[m] - x[m] for m in x}
    if joint:
        assert (joint_norms(delta) <= 0.5 + 1e-5).all()
    else:
        for m in eps:
            assert (sample_norms(delta[m]) <= eps[m] + 1e-5).all()
    assert adv["visual"].min() >= 0 and adv["visual"].max() <= 1
    assert toy.loss(adv, y) > toy.loss(x, y) + 0.01
    assert float(joint_norms(delta).min()) > 0.1  # it moved


def test_single_modality_attack_leaves_the_other_untouched_and_fgm_uses_the_full_radius():
    toy = _Toy()
    x = {"audio": torch.randn(4, 3, 4), "visual": torch.rand(4, 4, 5)}
    y = torch.zeros(4, dtype=torch.long)
    adv = l2_attack(lambda a: toy.loss(a, y), x, {"audio": 0.3, "visual": 0.0}, method="fgm", joint=False)
    assert torch.equal(adv["visual"], x["visual"])
    assert torch.allclose(sample_norms(adv["audio"] - x["audio"]), torch.full((4,), 0.3), atol=1e-5)


def test_attack_refuses_inference_mode():
    toy = _Toy()
    x = {"audio": torch.randn(2, 3, 4), "visual": torch.rand(2, 4, 5)}
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        l2_attack(lambda a: toy.loss(a, torch.zeros(2, dtype=torch.long)), x, {"audio": 0.1})


# ---------------------------------------------------------------------------------------------- config / sweep
def test_sweep_items_expand_and_validate():
    item = SweepItem(name="noise", setting={"audio_corruption": "white_noise"}, vary="severity", values=[1, 5])
    rows = item.settings()
    assert [v for v, _ in rows] == [1, 5] and [s.severity for _, s in rows] == [1, 5]
    assert rows[1][1].describe() == {"audio_corruption": "white_noise", "severity": 5, "snr_db": 0.0}
    with pytest.raises(ValueError, match="not a setting field"):
        SweepItem(name="x", vary="sevrity", values=[1])
    cfg = RobustnessConfig(sweep=[{"name": "pgd", "setting": {"attack": "pgd_l2", "attack_eps": 1.0}}])
    assert cfg.attacks and cfg.active and not RobustnessConfig().active
    with pytest.raises(ValueError, match="needs a radius"):
        EvalSetting(attack="fgm")


# ------------------------------------------------------------------------------------------------ on a task
@pytest.fixture(scope="module")
def ave_task():
    from avmoe.models.heads.ave import AVEHeadConfig
    from avmoe.models.presets import tiny_config
    from avmoe.tasks.ave import AVETask
    from avmoe.tasks.base import OptimConfig

    torch.manual_seed(0)
    head = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2)
    return AVETask(backbone=tiny_config(), head=head, optim=OptimConfig()).eval()


def _loss(task, batch) -> float:
    with torch.no_grad():
        _, out = task(batch)
        return float(sum(task.compute_losses(out, batch).values()))


def test_task_eval_step_applies_the_setting_to_what_the_encoders_see(ave_task):
    batch = ave_batch(ave_task, events=(3, 7), audio_scale=10.0, audio_shift=-40.0)
    seen = []
    hook = ave_task.backbone.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        for setting, check in [
            (EvalSetting(missing="audio"), lambda v, a: (a == silence_db()).all() and torch.equal(v, batch["video"])),
            (EvalSetting(missing="visual"), lambda v, a: (v == 0).all() and torch.equal(a, batch["audio"])),
            (EvalSetting(visual_corruption="gaussian_noise", severity=5), lambda v, a: not torch.equal(v, batch["video"])),
        ]:
            ave_task.eval_setting = setting
            with torch.no_grad():
                ave_task.test_step(batch, 0)  # the task loss and both uni-modal passes see the modified input
            assert check(*seen[-1]), setting
        ave_task.eval_setting = None
        with torch.no_grad():
            ave_task.test_step(batch, 0)
        assert torch.equal(seen[-1][1], batch["audio"]) and torch.equal(seen[-1][0], batch["video"])
    finally:
        hook.remove()
        ave_task.eval_setting = None
        ave_task.metrics["test_metric"].reset()
        ave_task.metrics["test_unimodal"].reset()


@pytest.mark.parametrize("setting", [
    EvalSetting(attack="pgd_l2", attack_eps=30.0, attack_steps=2),  # 2 of the 4 steps: the test's time budget
    EvalSetting(attack="fgm", attack_eps_audio=30.0),
    EvalSetting(attack="pgd_l2", attack_eps_visual=5.0, attack_steps=2),
])
def test_attacks_raise_the_task_loss_within_their_ball(ave_task, setting):
    batch = ave_batch(ave_task, events=(3, 7), audio_scale=10.0, audio_shift=-40.0)
    with torch.no_grad():  # as in Lightning's test loop with inference_mode=False
        adv = apply_setting(setting, ave_task, batch)
    assert _loss(ave_task, adv) > _loss(ave_task, batch)
    std = ave_task.backbone.pixel_std.view(1, 1, 3, 1, 1)
    dv = (adv["video"] - batch["video"].float() / 255) / std  # in normalised units, where the radius is
    da = adv["audio"] - batch["audio"]
    radii = setting.attack_radii()
    if setting.per_modality_attack:
        assert (sample_norms(da) <= radii.get("audio", 0) + 1e-3).all()
        assert (sample_norms(dv) <= radii.get("visual", 0) + 1e-3).all()
    else:
        assert (joint_norms({"a": da, "v": dv}) <= setting.attack_eps + 1e-3).all()
    assert adv["video"].min() >= 0 and adv["video"].max() <= 1  # valid pixels
