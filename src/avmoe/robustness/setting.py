"""The evaluation setting every task honours: missing modalities, corruptions and attacks at val/test time.

:class:`EvalSetting` is a plain config (a dataclass the CLI parses, see ``lightning_configs/robustness/``). A task
holds at most one (``AVTask.eval_setting``) and runs :func:`apply_setting` on each evaluation batch before its
forward pass (:meth:`avmoe.tasks.base.AVTask._eval_step`, ``predict_step``). Audio waveform corruptions happen
in the DataLoader workers instead (:class:`WaveCorruption`, installed by :mod:`avmoe.robustness.data`), because
batches carry log-mels.

Order: visual corruption -> missing modality -> attack. All random draws are per clip from
:func:`~avmoe.robustness.corruptions.clip_generator` ``(seed, sample index)``.

Missing-modality fills (``missing_fill``, recorded with every result):

- ``raw`` (default): audio becomes the log-mel of a *silent waveform* (``10 log10(amin)`` = -100 dB in every bin,
  exactly what zeroing the wave before the front end gives: the official AVMoE AVS ``--visual_only 1`` zeroes the
  raw wave, ``avs_scripts/avs_s4/test_v2.py``); video becomes *black frames* (0 before the normalisation). The
  encoders still run on that input.
- ``features``: the modality's features are zeroed after the backbone (the batch's ``audio_mask`` /
  ``visual_mask``, as balancing re-sampling does); per-clip only.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from avmoe.datamodules.batch import AUDIO, AUDIO_MASK, INDEX, VIDEO, VISUAL_MASK
from avmoe.robustness.attacks import PGD_STEPS, l2_attack
from avmoe.robustness.corruptions import (AUDIO_CORRUPTIONS, NOISE_SNRS, VISUAL_CORRUPTIONS, clip_generator,
                                          corrupt_audio, corrupt_video)

if TYPE_CHECKING:  # the task module imports this one
    from avmoe.tasks.base import AVTask



@functools.cache
def silence_db() -> float:
    """Log-mel value of an all-zero waveform in the data front end (``LogMel``): ``power_to_db(0)`` with ref 1.0
    and amin 1e-10 in float32, i.e. -100 dB up to float32 rounding (-100.00001)."""
    import librosa  # noqa: PLC0415

    return float(librosa.power_to_db(np.zeros(1, dtype=np.float32), ref=1.0, amin=1e-10, top_db=None)[0])


@dataclass
class EvalSetting:
    """One robustness condition for validation / test / predict (defaults: clean)."""

    missing: Literal["none", "audio", "visual", "either"] = "none"
    """Modality removed; ``either``: audio or visual with probability 1/2 per affected clip."""
    missing_rate: float = 1.0
    """Fraction of clips that lose it (each clip by its own seeded draw; 1.0 = all)."""
    missing_segment_p: float = 0.0
    """> 0: instead of whole clips, each 1-s segment of every clip loses the modality with this probability
    (temporal tasks, AVE / AVVP; video frames map to segments proportionally)."""
    missing_fill: Literal["raw", "features"] = "raw"
    """``raw``: silent waveform (log-mel of silence) / black frames; ``features``: zeroed features after the
    backbone (per clip only)."""
    audio_corruption: Literal["none", "white_noise", "lowpass"] = "none"
    """Waveform corruption before the log-mel (AVRobustBench levels)."""
    visual_corruption: Literal["none", "gaussian_noise", "gaussian_blur", "jpeg", "contrast", "occlusion"] = "none"
    """Pixel-space corruption before normalisation (ImageNet-C levels)."""
    severity: int = 3
    """Corruption severity 1-5 (both corruptions)."""
    snr_db: Optional[float] = None
    """white_noise: SNR in dB instead of the severity's (40, 30, 20, 10, 0)."""
    attack: Literal["none", "fgm", "pgd_l2"] = "none"
    """L2 attack with the task's own loss (CRMT ``rob_test.py``); needs Trainer(inference_mode=False)."""
    attack_eps: float = 0.0
    """Joint radius over ``attack_modalities`` (one L2 ball on the normalised frames and the log-mel)."""
    attack_modalities: list[str] = field(default_factory=lambda: ["audio", "visual"])
    """Modalities the joint attack perturbs."""
    attack_eps_audio: Optional[float] = None
    """Per-modality radius of the audio (set this and/or attack_eps_visual for a per-modality attack)."""
    attack_eps_visual: Optional[float] = None
    """Per-modality radius of the (normalised) frames, clamped to valid pixels."""
    attack_steps: int = PGD_STEPS
    """PGD steps (step size radius / 3)."""
    seed: int = 0
    """Seed of every per-clip draw (with the sample index)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.missing_rate <= 1.0 or not 0.0 <= self.missing_segment_p <= 1.0:
            raise ValueError(f"missing_rate / missing_segment_p must be in [0, 1], got {self.missing_rate} / "
                             f"{self.missing_segment_p}")
        if self.missing_segment_p > 0 and self.missing_fill == "features":
            raise ValueError("missing_fill=features zeroes whole clips' features; per-segment missing needs "
                             "missing_fill=raw")
        if (self.audio_corruption != "none" or self.visual_corruption != "none") and not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {self.severity}")
        bad = set(self.attack_modalities) - {"audio", "visual"}
        if bad:
            raise ValueError(f"attack_modalities must be audio / visual, got {sorted(bad)}")
        if self.attack != "none" and not self.attack_radii():
            raise ValueError(f"attack={self.attack} needs a radius (attack_eps, attack_eps_audio or attack_eps_visual)")

    # ---- what the setting does ----------------------------------------------------------------------------
    @property
    def is_clean(self) -> bool:
        return self.missing == "none" and self.audio_corruption == "none" and self.visual_corruption == "none" \
            and self.attack == "none"

    @property
    def per_modality_attack(self) -> bool:
        return self.attack_eps_audio is not None or self.attack_eps_visual is not None

    def attack_radii(self) -> dict[str, float]:
        """Radius per attacked modality (joint: the same value for each)."""
        if self.per_modality_attack:
            radii = {"audio": self.attack_eps_audio or 0.0, "visual": self.attack_eps_visual or 0.0}
        else:
            radii = {m: self.attack_eps for m in self.attack_modalities}
        return {m: float(e) for m, e in radii.items() if e > 0}

    @property
    def snr(self) -> Optional[float]:
        if self.audio_corruption != "white_noise":
            return None
        return self.snr_db if self.snr_db is not None else NOISE_SNRS[self.severity - 1]

    def describe(self) -> dict[str, Any]:
        """The non-default fields (what the result rows record), with the fill whenever something is missing."""
        default = EvalSetting()
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}
        if self.missing != "none":
            out["missing_fill"] = self.missing_fill
        if self.snr is not None:
            out["snr_db"] = self.snr
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_setting(value: Any) -> Optional[EvalSetting]:
    """An :class:`EvalSetting` from itself, a dict (e.g. parsed YAML) or None."""
    if value is None or isinstance(value, EvalSetting):
        return value
    return EvalSetting(**dict(value))


# ---------------------------------------------------------------------------------------------------- selection
def _uniform(seed: int, index: int, use: str, n: int = 1) -> Tensor:
    return torch.rand(n, generator=clip_generator(seed, index, use))


def missing_masks(setting: EvalSetting, indices: Tensor, num_segments: int) -> dict[str, Tensor]:
    """Which (clip, segment) lose which modality: ``{"audio": (B, T) bool, "visual": (B, T) bool}``.

    Per clip (``missing_segment_p == 0``): a clip is affected when its draw is below ``missing_rate``, then every
    segment of it is; per segment: each segment's own draw is below ``missing_segment_p``. ``either`` picks the
    modality per affected clip (or segment) by a second draw. Depends only on ``(seed, index)``.
    """
    b = len(indices)
    out = {m: torch.zeros(b, num_segments, dtype=torch.bool) for m in ("audio", "visual")}
    if setting.missing == "none":
        return out
    for row, index in enumerate(indices.tolist()):
        if setting.missing_segment_p > 0:
            hit = _uniform(setting.seed, index, "missing", num_segments) < setting.missing_segment_p
        else:
            hit = (_uniform(setting.seed, index, "missing") < setting.missing_rate).expand(num_segments)
        if setting.missing == "either":
            which = _uniform(setting.seed, index, "missing_which", num_segments if setting.missing_segment_p else 1)
            audio = (which < 0.5).expand(num_segments)
            out["audio"][row], out["visual"][row] = hit & audio, hit & ~audio
        else:
            out[setting.missing][row] = hit
    return out


def _frames_of_segments(seg_mask: Tensor, num_frames: int) -> Tensor:
    """(B, S) segment mask -> (B, F) frame mask, frame f in segment ``floor(f S / F)``."""
    seg = (torch.arange(num_frames) * seg_mask.shape[1]) // num_frames
    return seg_mask[:, seg]


def drop_modalities(setting: EvalSetting, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with the selected clips / segments' modalities removed by ``missing_fill``."""
    if setting.missing == "none":
        return batch
    audio, video = batch[AUDIO], batch[VIDEO]
    masks = missing_masks(setting, batch[INDEX].cpu(), audio.shape[1])
    batch = dict(batch)
    if setting.missing_fill == "features":
        for modality, key in (("audio", AUDIO_MASK), ("visual", VISUAL_MASK)):
            keep = (~masks[modality][:, 0]).to(audio.device, torch.float32)
            batch[key] = batch.get(key, torch.ones_like(keep)).to(keep.dtype) * keep
        return batch
    a = masks["audio"].to(audio.device)  # (B, T)
    if a.any():
        batch[AUDIO] = torch.where(a.view(*a.shape, *([1] * (audio.dim() - 2))), torch.full_like(audio, silence_db()),
                                   audio)
    v = _frames_of_segments(masks["visual"], video.shape[1]).to(video.device)  # (B, F)
    if v.any():
        batch[VIDEO] = torch.where(v.view(*v.shape, 1, 1, 1), torch.zeros_like(video), video)
    return batch


# ------------------------------------------------------------------------------------------------- corruptions
def corrupt_frames(setting: EvalSetting, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with every clip's uint8 frames corrupted (one draw per clip)."""
    if setting.visual_corruption == "none":
        return batch
    video = batch[VIDEO]
    clips = [corrupt_video(clip, setting.visual_corruption, setting.severity,
                           clip_generator(setting.seed, index, "visual"))
             for clip, index in zip(video, batch[INDEX].tolist())]
    return {**batch, VIDEO: torch.stack(clips).to(video.device)}


class WaveCorruption:
    """Picklable waveform transform for the log-mel front end: ``(segments (T, S) float32, index) -> same``.

    The clip (all its segments) is corrupted as one signal, one draw per clip.
    """

    def __init__(self, setting: EvalSetting, sample_rate: int) -> None:
        self.setting = setting
        self.sample_rate = sample_rate

    def __call__(self, segments: np.ndarray, index: int) -> np.ndarray:
        s = self.setting
        wave = torch.from_numpy(np.ascontiguousarray(segments, dtype=np.float32))
        out = corrupt_audio(wave, s.audio_corruption, s.severity, clip_generator(s.seed, index, "audio"),
                            self.sample_rate, snr=s.snr)
        return out.numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------------ attacks
def model_inputs(task: "AVTask", batch: dict[str, Any]) -> tuple[dict[str, Tensor], Any, Tensor, Tensor]:
    """The tensors attacks (and Lipschitz estimates) differentiate: ``{"audio": log-mel, "visual": normalised
    frames (B, T, 3, H, W)}``, a function mapping them back to a batch (frames as float pixels), and the
    normalised pixel box ``(lo, hi)`` (1, 1, 3, 1, 1)."""
    mean = task.backbone.pixel_mean.view(1, 1, 3, 1, 1)
    std = task.backbone.pixel_std.view(1, 1, 3, 1, 1)
    video = batch[VIDEO]
    pixels = video.float() / 255.0 if not video.is_floating_point() else video.float()
    inputs = {"audio": batch[AUDIO].float(), "visual": (pixels - mean) / std}

    def to_batch(x: dict[str, Tensor]) -> dict[str, Any]:
        return {**batch, AUDIO: x["audio"], VIDEO: x["visual"] * std + mean}

    return inputs, to_batch, (0 - mean) / std, (1 - mean) / std


def attack_batch(setting: EvalSetting, task: "AVTask", batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its log-mel and/or frames replaced by an L2 attack on the task's own loss.

    Audio is attacked as the log-mel the backbone consumes (not clamped, as CRMT leaves audio unclamped); the
    frames in the backbone's normalised space (the radius is measured there, as CRMT's), clamped to the pixel
    box [0, 1] and handed on as float pixels.
    """
    radii = setting.attack_radii()
    if setting.attack == "none" or not radii:
        return batch
    inputs, to_batch, lo, hi = model_inputs(task, batch)

    def loss_fn(x: dict[str, Tensor]) -> Tensor:
        b = to_batch(x)
        _, outputs = task(b)
        return torch.stack([v.float() for v in task.compute_losses(outputs, b).values()]).sum()

    adv = l2_attack(loss_fn, inputs, radii, method=setting.attack, joint=not setting.per_modality_attack,
                    steps=setting.attack_steps, clamp={"visual": lambda z: torch.maximum(torch.minimum(z, hi), lo)})
    out = to_batch(adv)
    out[VIDEO] = out[VIDEO].clamp(0, 1)  # float rounding of the un-normalisation
    return out


def apply_setting(setting: Optional[EvalSetting], task: "AVTask", batch: dict[str, Any]) -> dict[str, Any]:
    """Visual corruption, missing modality, then attack; the audio waveform part happened in the loader."""
    if setting is None or setting.is_clean:
        return batch
    batch = corrupt_frames(setting, batch)
    batch = drop_modalities(setting, batch)
    return attack_batch(setting, task, batch)


def wave_corruption(setting: Optional[EvalSetting], sample_rate: int) -> Optional[WaveCorruption]:
    """The loader-side part of ``setting`` (None when it has no audio corruption)."""
    if setting is None or setting.audio_corruption == "none":
        return None
    if setting.audio_corruption not in AUDIO_CORRUPTIONS:
        raise ValueError(f"unknown audio corruption {setting.audio_corruption!r}")
    return WaveCorruption(setting, sample_rate)


__all__ = ["EvalSetting", "silence_db", "VISUAL_CORRUPTIONS", "apply_setting", "as_setting", "attack_batch",
           "corrupt_frames", "drop_modalities", "missing_masks", "wave_corruption", "WaveCorruption"]
