"""What the AVMoE backbone returns: the contract every task head consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class BackboneOutput:
    """Features of a batch of clips (B clips x T frames, M = B * T frames in total).

    Audio-side tensors: ``audio``, ``audio_tokens``. Visual-side: ``visual``, ``visual_tokens``,
    ``visual_stages``. ``with_modality_scale`` multiplies every tensor of one side per sample, which is how
    missing modalities, OPM feature dropping and uni-modal probing are expressed for any head.
    """

    visual: Tensor  # (B, T, Cv) per-frame mean of the final Swin tokens (after the final LayerNorm)
    audio: Tensor  # (B, T, Ca) per-frame mean of the last HTS-AT stage tokens (no final norm, as official)
    visual_tokens: Tensor  # (B, T, Nv, Cv) final Swin tokens after LayerNorm (AVQA grounding)
    audio_tokens: Tensor  # (B, T, Na, Ca) last HTS-AT stage tokens
    visual_stages: list[Tensor] = field(default_factory=list)  # per stage (B, T, N_s, C_s), before patch merging
    # (the last after the final norm); AVS taps these
    visual_grids: list[tuple[int, int]] = field(default_factory=list)  # (H_s, W_s) of each visual stage
    router_weights: list[Tensor] = field(default_factory=list)  # one (M, E) softmax per MoE module, for logging
    aux_loss: Tensor = field(default_factory=lambda: torch.zeros(()))  # weighted load-balancing loss (scalar)
    audio_present: Optional[Tensor] = None  # (B,) bool: samples whose audio was not scaled to zero; None = all
    visual_present: Optional[Tensor] = None  # (B,) bool, the same for the visual side

    @property
    def batch_size(self) -> int:
        return self.visual.shape[0]

    @property
    def num_frames(self) -> int:
        return self.visual.shape[1]

    def with_modality_scale(self, audio: Optional[Tensor] = None, visual: Optional[Tensor] = None) -> "BackboneOutput":
        """Scale every audio-side / visual-side feature per sample. ``audio``/``visual``: (B,) or None (unchanged)."""
        out = self
        if audio is not None:
            out = replace(out, audio=_scale(out.audio, audio), audio_tokens=_scale(out.audio_tokens, audio),
                          audio_present=out.present("audio") & (audio.reshape(-1).to(out.audio.device) != 0))
        if visual is not None:
            out = replace(
                out,
                visual=_scale(out.visual, visual),
                visual_tokens=_scale(out.visual_tokens, visual),
                visual_stages=[_scale(s, visual) for s in out.visual_stages],
                visual_present=out.present("visual") & (visual.reshape(-1).to(out.visual.device) != 0),
            )
        return out

    def present(self, modality: str) -> Tensor:
        """(B,) bool: which samples still carry ``modality`` (false once a scale of zero dropped it)."""
        flags = self.audio_present if modality == "audio" else self.visual_present
        if flags is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.visual.device)
        return flags

    def drop(self, modality: str) -> "BackboneOutput":
        """All features of ``modality`` ("audio" or "visual") set to zero (the missing-modality convention)."""
        zeros = torch.zeros(self.batch_size, device=self.visual.device, dtype=self.visual.dtype)
        return self.with_modality_scale(**{modality: zeros})

    def detach(self) -> "BackboneOutput":
        return replace(
            self,
            visual=self.visual.detach(),
            audio=self.audio.detach(),
            visual_tokens=self.visual_tokens.detach(),
            audio_tokens=self.audio_tokens.detach(),
            visual_stages=[s.detach() for s in self.visual_stages],
            router_weights=[r.detach() for r in self.router_weights],
            aux_loss=self.aux_loss.detach(),
        )


def _scale(x: Tensor, s: Tensor) -> Tensor:
    """Multiply (B, ...) by a per-sample factor (B,)."""
    return x * s.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
