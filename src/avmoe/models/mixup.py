"""Training-time audio mixup of the official AVVP / AVS / AVQA recipes (yingchengy/AVMOE ``utils.py::do_mixup``).

The official code draws ``lam ~ Beta(0.5, 0.5)`` per item and mixes the HTS-AT input with the batch-reversed
input (``utils.py::do_mixup``) inside the encoder, i.e. over the flattened (B*T) batch of 1-s segments; labels
are not mixed. The HTS-AT's input BatchNorm is a per-bin affine map in eval mode, so mixing the log-mel before it
is the same as mixing after it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

PARTNERS = ("frames", "clips")


def mixup_partner_index(b: int, t: int, partner: str, device: Optional[torch.device] = None) -> Tensor:
    """Flat (B*T) index of each segment's partner. ``frames``: reversed flat order; ``clips``: reversed clips."""
    if partner == "frames":
        return torch.arange(b * t - 1, -1, -1, device=device)
    if partner == "clips":
        return (torch.arange(b - 1, -1, -1, device=device)[:, None] * t + torch.arange(t, device=device)).reshape(-1)
    raise ValueError(f"mixup partner must be one of {PARTNERS}, got {partner!r}")


def mix_log_mel(audio: Tensor, alpha: float, partner: str = "frames") -> tuple[Tensor, Tensor]:
    """Mix each segment's log-mel with its partner's. audio (B, T, F, n_mels) -> (mixed, lam (B, T)).

    ``lam`` comes from torch's global CPU generator (``StepSeeding`` makes it a function of the step, so a resumed
    run draws the same values) and is applied in the input's dtype.
    """
    b, t = audio.shape[:2]
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample((b * t,))
    flat = audio.reshape(b * t, *audio.shape[2:])
    index = mixup_partner_index(b, t, partner, device=audio.device)
    w = lam.to(device=audio.device, dtype=audio.dtype).view(-1, *([1] * (flat.dim() - 1)))
    mixed = w * flat + (1 - w) * flat[index]
    return mixed.view_as(audio), lam.view(b, t)

