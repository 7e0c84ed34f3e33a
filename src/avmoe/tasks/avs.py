"""AVS: audio-visual segmentation on AVSBench S4 / MS3 (pixel masks of the sounding objects, 5 frames per clip).

Losses (OpenNLPLab/AVSBench ``avs_scripts/avs_{s4,ms3}/loss.py``, as used by yingchengy/AVMOE ``AVMOE/AVS``):

- ``loss_bce``: binary cross-entropy on the logits of the *annotated* frames (``mask_valid``), averaged over
  their pixels. S4 training clips are annotated on frame 1 only, so this is the official S4 loss
  (``F1_IoU_BCELoss`` on the first frame); MS3 clips are annotated on all five (``F5_IoU_BCELoss``).
- ``loss_masked_av`` (MS3, ``loss.masked_av_weight`` = lambda_1 = 0.5): ``A_MaskedV_SimmLoss`` with
  ``--kl_flag``: per stage, the logits are average-pooled to the stage map, passed through a sigmoid, weight
  the (ReLU'd) TPAVI map, are averaged over space and compared with the TPAVI-aligned audio by
  ``KL(softmax(audio) || softmax(masked visual))`` summed over frames and channels; mean over stages.
- The load-balancing term of the MoE routers comes with the backbone (``adapter.load_balance_weight``, 0.01 MS3).

Visual-only evaluation (``visual_only_eval``, the paper's missing-modality study; official ``--visual_only 1``):
at validation / test / predict time the audio is replaced by *silence*. The official code zeroes the waveform;
the log-mel of a zero waveform is ``10 log10(amin) = -100 dB`` in every bin (``LogMel``: ref 1.0, amin 1e-10), so
the audio input becomes that constant (:func:`silence_db`); the HTS-AT still runs, as in the official code. This
differs from ``audio_mask = 0``, which zeroes the audio *features* after the backbone. Training is unaffected.
It is an alias of the shared robustness setting every task has (:data:`VISUAL_ONLY`, ``AVTask.eval_setting``;
``lightning_configs/robustness/visual_only.yaml`` does the same on any task from the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric

from avmoe.datamodules.avsbench import S4_CATEGORIES
from avmoe.datamodules.batch import INDEX
from avmoe.metrics.avs import OFFICIAL_CLIPS_PER_BATCH, AVSMetric, frame_iou
from avmoe.models.config import AVMoEConfig
from avmoe.models.heads.avs import AVSHead, AVSHeadConfig
from avmoe.models.heads.unimodal import DenseReadout, Readout
from avmoe.models.outputs import BackboneOutput
from avmoe.robustness.setting import EvalSetting, silence_db
from avmoe.tasks.base import AVTask, Batch, OptimConfig, Outputs, UnimodalConfig, as_config, plain
from avmoe.tasks.predictions import write_mask_png, write_probability_png


@dataclass
class AVSLossConfig:
    """Loss terms beyond the BCE on annotated frames."""

    masked_av_weight: float = 0.0
    """lambda_1 of the masked audio-visual KL loss (0 = off; 0.5 in the official MS3 script)."""
    masked_av_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Stages the masked AV loss uses (each must have a TPAVI block)."""
    mask_pooling: Literal["avg", "max"] = "avg"
    """How the predicted mask is pooled to a stage map (official default: avg)."""
    normalize_features: bool = False
    """L2-normalise both features before the KL (official ``--norm_fea_flag``, off in the MS3 script)."""


VISUAL_ONLY = EvalSetting(missing="audio", missing_rate=1.0, missing_fill="raw")  # the official --visual_only 1


def silence_like(audio: Tensor) -> Tensor:
    """The log-mel of silence with the shape of ``audio`` (see :func:`silence_db`)."""
    return torch.full_like(audio, silence_db())


def masked_av_loss(
    logits: Tensor, maps: list[Tensor], audio: list[Tensor], pooling: str = "avg", normalize: bool = False
) -> Tensor:
    """AVSBench ``A_MaskedV_SimmLoss`` (KL variant, no thresholding).

    Args:
        logits: (B, T, S, S) mask logits.
        maps: per stage (M, C, h, w) visual maps (M = B * T).
        audio: per stage (B, T, C) audio features.
        pooling: ``avg`` or ``max`` pooling of the logits to (h, w).
        normalize: L2-normalise the features first.

    Returns:
        Scalar: mean over stages of ``KL(softmax(a) || softmax(v))`` summed over frames and channels.
    """
    pred = logits.flatten(0, 1).unsqueeze(1)  # (M, 1, S, S)
    pool = F.adaptive_avg_pool2d if pooling == "avg" else F.adaptive_max_pool2d
    total = logits.new_zeros(())
    for v_map, a in zip(maps, audio):
        weight = torch.sigmoid(pool(pred, v_map.shape[-2:]))  # (M, 1, h, w)
        v = (v_map * weight).mean((-2, -1))  # (M, C)
        a = a.reshape(-1, a.shape[-1])  # (M, C)
        if normalize:
            v, a = F.normalize(v, dim=-1), F.normalize(a, dim=-1)
        total = total + F.kl_div(F.log_softmax(v, -1), F.softmax(a, -1), reduction="sum")
    return total / max(len(maps), 1)


UNUSED_DECODER_PREFIX = "head.paths.3.rcu1."  # the official path4.resConfUnit1, never called


def _loss_dtype(x: Tensor) -> Tensor:
    """At least float32 (half / bfloat16 logits are upcast), float64 kept: a float64 run has no float32 rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def clip_bce(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Pixel BCE averaged over each clip's annotated frames. logits/target (B, T, S, S), valid (B, T) -> (B,)."""
    logits = _loss_dtype(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean((-2, -1))
    return (bce * valid).sum(1) / valid.sum(1).clamp(min=1)


class AVSTask(AVTask):
    """AVMoE backbone + AVS head (taps, temporal gating, TPAVI, decoder) with the official losses and M_J / M_F.

    Args:
        backbone: AVMoE backbone configuration (encoders, adapters; ``audio.trainable`` = the S4 quirk).
        head: AVS head sizes.
        loss: extra loss terms (MS3 masked AV loss).
        optim: optimizer and schedule.
        visual_only_eval: evaluate (val / test / predict) with the audio replaced by silence.
        metric_clips_per_batch: clips per call of the official metric aggregation (4 as the official test).
        unimodal: uni-modal predictions for the balancing callbacks (zeroed features or auxiliary heads).
        crmt: not available (True raises ValueError): the head is not a linear fusion of per-modality
            features (``crmt_unsupported`` says why).
    """

    crmt_unsupported = (
        "The AVS output is a per-pixel mask from the TPAVI audio-visual non-local fusion and a convolutional "
        "decoder, not class logits that are a linear fusion of per-modality features (CRMT's certified bound is "
        "defined for such a classifier)."
    )
    monitor = "val/mj"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: AVMoEConfig = AVMoEConfig(),
        head: AVSHeadConfig = AVSHeadConfig(),
        loss: AVSLossConfig = AVSLossConfig(),
        optim: OptimConfig = OptimConfig(step_size=None),
        visual_only_eval: bool = False,
        metric_clips_per_batch: int = OFFICIAL_CLIPS_PER_BATCH,
        unimodal: UnimodalConfig = UnimodalConfig(),
        crmt: bool = False,
    ) -> None:
        self.refuse_crmt(crmt)
        self.metric_clips_per_batch = metric_clips_per_batch  # read by make_metric inside super().__init__
        super().__init__(backbone=backbone, optim=optim, unimodal=unimodal)
        self.head_config = as_config(AVSHeadConfig, head)
        self.loss_config = as_config(AVSLossConfig, loss)
        missing = sorted(set(self.loss_config.masked_av_stages) - set(self.head_config.tpavi_stages))
        if self.loss_config.masked_av_weight > 0 and missing:
            raise ValueError(f"loss.masked_av_stages {missing} have no TPAVI block (head.tpavi_stages = "
                             f"{self.head_config.tpavi_stages})")
        dims = self.backbone.feature_dims
        self.head = AVSHead(dims["visual_stages"], dims["audio"], self.head_config)
        self.build_unimodal_heads()
        self.visual_only_eval = visual_only_eval
        self.save_hyperparameters(plain({
            "backbone": self.backbone_config, "head": self.head_config, "loss": self.loss_config,
            "optim": self.optim, "visual_only_eval": visual_only_eval,
            "metric_clips_per_batch": metric_clips_per_batch, "unimodal": self.unimodal,
        }))

    # ---- forward --------------------------------------------------------------------------------------------
    @property
    def visual_only_eval(self) -> bool:
        """Whether evaluation replaces the audio by silence (alias of ``eval_setting`` = :data:`VISUAL_ONLY`)."""
        return self.eval_setting == VISUAL_ONLY

    @visual_only_eval.setter
    def visual_only_eval(self, value: bool) -> None:
        self.eval_setting = VISUAL_ONLY if value else None

    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        return self.head(feats.visual_stages, feats.visual_grids, feats.audio)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the deepest decoder block lost its never-used ``rcu1`` still load."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(UNUSED_DECODER_PREFIX)]:
            del state[key]
        super().on_load_checkpoint(checkpoint)

    # ---- auxiliary uni-modal heads ------------------------------------------------------------------------
    def make_unimodal_head(self, modality: str) -> nn.Module:
        """Visual: per-token mask logits on the final Swin grid, resized to the mask. Audio: one logit per frame
        for the whole mask (sound alone cannot say where; it can say how much of the frame sounds)."""
        dims, size = self.backbone.feature_dims, self.head_config.mask_size
        if modality == "visual":
            return DenseReadout(dims["visual"], dims["visual_grids"][-1], size)
        return Readout(dims["audio"], 1)

    def unimodal_head_forward(self, modality: str, feats: BackboneOutput, batch: Batch) -> Outputs:
        head = self.unimodal_heads[modality]  # type: ignore[index]
        if modality == "visual":
            return {"logits": head(feats.visual_tokens)}  # (B, T, S, S)
        size = self.head_config.mask_size
        return {"logits": head(feats.audio)[..., None].expand(-1, -1, size, size)}  # (B, T, 1, 1) -> (B, T, S, S)

    def unimodal_sample_loss(self, modality: str, outputs: Outputs, batch: Batch) -> Tensor:
        """Per-clip BCE over the annotated frames (what ``sample_scores`` exponentiates)."""
        return clip_bce(*self._targets(outputs, batch))

    # ---- losses ---------------------------------------------------------------------------------------------
    @staticmethod
    def _targets(outputs: Outputs, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        logits = outputs["logits"]  # (B, T, S, S)
        target = batch["mask"][:, :, 0].to(logits.dtype)  # (B, T, S, S)
        if target.shape != logits.shape:
            raise ValueError(f"masks have shape {tuple(target.shape)} but the head predicts {tuple(logits.shape)}; "
                             "set head.mask_size to the data's mask_size")
        return logits, target, batch["mask_valid"].bool()

    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        logits, target, valid = self._targets(outputs, batch)
        logits = _loss_dtype(logits)
        losses = {"loss_bce": F.binary_cross_entropy_with_logits(logits[valid], target[valid].to(logits.dtype))}
        cfg = self.loss_config
        if cfg.masked_av_weight > 0:
            stages = sorted(set(cfg.masked_av_stages))
            maps = [outputs[f"stage_map_{s}"] for s in stages]
            audio = [outputs[f"stage_audio_{s}"] for s in stages]
            kl = masked_av_loss(logits, maps, audio, cfg.mask_pooling, cfg.normalize_features)
            losses["loss_masked_av"] = cfg.masked_av_weight * kl
        return losses

    # ---- metrics --------------------------------------------------------------------------------------------
    def make_metric(self) -> Metric:
        return AVSMetric(clips_per_batch=self.metric_clips_per_batch)

    def update_metric(self, metric: Metric, outputs: Outputs, batch: Batch) -> None:
        logits, target, valid = self._targets(outputs, batch)
        names = batch.get("category")
        category = None
        if names is not None and any(names):  # S4 names a category per clip (MS3 has none)
            ids = [S4_CATEGORIES.index(n) if n in S4_CATEGORIES else -1 for n in names]
            category = torch.tensor(ids, device=logits.device)
        metric.update(batch[INDEX], logits.detach(), target, valid, category)

    def name_details(self, details: dict[str, Any]) -> dict[str, Any]:
        return {k: {(S4_CATEGORIES[c] if 0 <= c < len(S4_CATEGORIES) else "unknown"): v for c, v in d.items()}
                for k, d in details.items()}

    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        """``exp(-BCE)`` per clip over its annotated pixels, in (0, 1]."""
        return torch.exp(-clip_bce(*self._targets(outputs, batch)))

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Mean official IoU (``sigmoid > 0.5``) over each clip's annotated frames."""
        logits, target, valid = self._targets(outputs, batch)
        b, t = logits.shape[:2]
        iou = frame_iou(logits.flatten(0, 1), target.flatten(0, 1)).view(b, t)
        return (iou * valid).sum(1) / valid.sum(1).clamp(min=1)

    # ---- loops ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> Outputs:  # type: ignore[override]
        """Returns the outputs so that callbacks (mask pictures) can read the logits."""
        return self._eval_step(batch, "val")

    prediction_name = "avs"

    def predictions(self, batch: Batch, outputs: Outputs) -> dict[str, Any]:
        """Per-pixel probabilities ``sigmoid(logits)`` (B, T, S, S) and binary masks at the official rule
        ``sigmoid > 0.5``, with the sample index, video id and (own videos) the frames' size."""
        probs = torch.sigmoid(outputs["logits"].float())
        return {INDEX: batch[INDEX], "video_id": batch.get("video_id"), "masks": probs > 0.5, "probs": probs,
                "frame_size": batch.get("frame_size")}

    def prediction_records(self, batch: Batch, predictions: dict[str, Any]) -> list[dict[str, Any]]:
        """Writes per clip ``predictions/avs_masks/<video_id>/<t>.png`` (the mask, 0 / 255) and ``<t>_prob.png``
        (the probabilities, 16-bit: ``round(p * 65535)``, :func:`~avmoe.tasks.predictions.read_probability_png`),
        t from 1 as the release's frame names, at the head's output resolution (``head.mask_size``, 224 as the
        release's masks); returns per clip the files (relative to the predictions folder), the predicted
        foreground fraction of each frame and, for your own videos, their frame size (H, W) to resize back to."""
        folder = self.prediction_path().parent
        vids = predictions["video_id"] or [None] * len(predictions[INDEX])
        sizes = predictions.get("frame_size")
        records = []
        for i, (index, vid) in enumerate(zip(predictions[INDEX].tolist(), vids)):
            clip, probs = predictions["masks"][i].cpu().numpy(), predictions["probs"][i].cpu().numpy()
            name = str(vid) if vid is not None else f"{index:06d}"
            files = [f"avs_masks/{name}/{t + 1}.png" for t in range(len(clip))]
            prob_files = [f"avs_masks/{name}/{t + 1}_prob.png" for t in range(len(clip))]
            for file, prob_file, mask, prob in zip(files, prob_files, clip, probs):
                write_mask_png(folder / file, mask)
                write_probability_png(folder / prob_file, prob)
            record = {"index": int(index), "video_id": vid, "masks": files, "probabilities": prob_files,
                      "foreground": [round(float(m.mean()), 6) for m in clip]}
            if sizes is not None:
                record["frame_size"] = [int(v) for v in sizes[i].tolist()]
            records.append(record)
        return records

    def on_predict_epoch_end(self) -> None:
        wrote = bool(self._prediction_records)
        super().on_predict_epoch_end()
        if wrote:
            rank_zero_info(f"predict: masks (<t>.png, 0/255) and probabilities (<t>_prob.png, 16-bit p * 65535) per "
                           f"frame in {self.prediction_path().parent / 'avs_masks'}/<video_id>/")
