"""MMCSAL stage 1: self-supervised projection heads on the frozen pooled audio / visual features.

Follows the MMCSAL abstract (Shen et al., ACM MM Asia 2024, arXiv 2412.09126): self-supervision from cross-modal
pairing alone leaves a *modality gap* (distance between the centroids of the two modalities' representations),
and uni-modal prototypes bridge it. The loss forms are a reconstruction (the paper's equations could not be read):

- cross-modal: symmetric InfoNCE between the normalised audio and visual projections of the same clip;
- uni-modal prototypes (ProtoNCE style, Li et al., ICLR 2021): every ``proto_every`` epochs k-means on each
  modality's normalised embeddings gives K prototypes and assignments; each embedding is classified to its own
  prototype with temperature ``proto_temperature``;
- total ``L = L_cm + proto_weight * (L_proto_audio + L_proto_visual)``;
- gap (Liang et al., "Mind the Gap", NeurIPS 2022): ``|| mean_i z_a^i - mean_i z_v^i ||_2`` on normalised embeddings.

Training runs on the cached features (N, C) in a plain seeded loop on one process: the features are small and
every rank holds all of them after the gather, so every rank computes the same heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn


@dataclass
class Stage1Config:
    """Stage-1 self-supervised training of the two projection heads."""

    enabled: bool = True
    """False: stage 2 runs on the normalised frozen features themselves (then both must have the same width)."""
    dim: int = 64
    """Width of the shared embedding space."""
    hidden: int = 256
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    """InfoNCE temperature tau."""
    proto_weight: float = 1.0
    """lambda_u: weight of the uni-modal prototype losses (0 = cross-modal pairing only, the gap-prone baseline)."""
    num_prototypes: int = 10
    """K of the per-modality k-means (about the number of classes, which cold start does not know exactly)."""
    proto_temperature: float = 0.1
    proto_every: int = 1
    """Recompute the prototypes every this many epochs."""


class ProjectionHeads(nn.Module):
    """Two MLPs mapping pooled audio (B, Ca) and visual (B, Cv) features to normalised (B, dim) embeddings.

    Inputs are first standardised per channel with the pool statistics (:meth:`set_statistics`): pooled encoder
    features have arbitrary per-channel scales.
    """

    def __init__(self, audio_dim: int, visual_dim: int, dim: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(audio_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.visual = nn.Sequential(nn.Linear(visual_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for name, width in (("audio", audio_dim), ("visual", visual_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(width))
            self.register_buffer(f"{name}_std", torch.ones(width))

    def set_statistics(self, audio: Tensor, visual: Tensor) -> None:
        """Per-channel mean / std of the pool's audio (N, Ca) and visual (N, Cv) features."""
        self.audio_mean.copy_(audio.mean(0))
        self.audio_std.copy_(audio.std(0) + 1e-6)
        self.visual_mean.copy_(visual.mean(0))
        self.visual_std.copy_(visual.std(0) + 1e-6)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        a = self.audio((audio - self.audio_mean) / self.audio_std)
        v = self.visual((visual - self.visual_mean) / self.visual_std)
        return F.normalize(a, dim=-1), F.normalize(v, dim=-1)


def info_nce(za: Tensor, zv: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE: clip i's audio must pick its own visual among the batch, and vice versa."""
    logits = za @ zv.T / temperature  # (B, B)
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def modality_gap(za: Tensor | np.ndarray, zv: Tensor | np.ndarray) -> float:
    """Distance between the centroids of the L2-normalised audio and visual embeddings."""
    a = F.normalize(torch.as_tensor(np.asarray(za), dtype=torch.float64), dim=-1)
    v = F.normalize(torch.as_tensor(np.asarray(zv), dtype=torch.float64), dim=-1)
    return float((a.mean(0) - v.mean(0)).norm())


def prototypes(z: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """k-means on normalised embeddings (N, d): normalised centroids (k, d) and assignments (N,)."""
    km = KMeans(n_clusters=min(k, len(z)), n_init=1, random_state=seed).fit(z.detach().cpu().double().numpy())
    centres = F.normalize(torch.as_tensor(km.cluster_centers_, dtype=z.dtype), dim=-1)
    return centres, torch.as_tensor(km.labels_, dtype=torch.int64)


def proto_loss(z: Tensor, centres: Tensor, assign: Tensor, temperature: float) -> Tensor:
    """ProtoNCE-style: each embedding (B, d) classified to its own prototype among the k (k, d)."""
    return F.cross_entropy(z @ centres.T / temperature, assign)


def train_stage1(audio: np.ndarray, visual: np.ndarray, config: Stage1Config, seed: int = 0,
                 log: list[dict] | None = None) -> ProjectionHeads:
    """Train the projection heads on pooled features audio (N, Ca), visual (N, Cv); returns them in eval mode.

    ``log`` (if given) receives one dict per epoch: ``epoch``, ``loss_cm``, ``loss_proto``, ``gap`` (epoch -1: the
    gap of the initial heads, before training).
    """
    if len(audio) != len(visual):
        raise ValueError(f"audio features hold {len(audio)} samples, visual {len(visual)}")
    if len(audio) < 2:
        raise ValueError(f"stage 1 needs at least 2 pairs for the contrastive loss, got {len(audio)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    a = torch.as_tensor(audio, dtype=torch.float32)
    v = torch.as_tensor(visual, dtype=torch.float32)
    heads = ProjectionHeads(a.shape[1], v.shape[1], config.dim, config.hidden)
    heads.set_statistics(a, v)
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(a)
    protos = None
    if log is not None:
        with torch.no_grad():
            log.append({"epoch": -1, "loss_cm": float("nan"), "loss_proto": float("nan"), "gap": modality_gap(*heads(a, v))})
    for epoch in range(config.epochs):
        heads.train()
        if config.proto_weight > 0 and epoch % config.proto_every == 0:
            with torch.no_grad():
                za, zv = heads(a, v)
            protos = (prototypes(za, config.num_prototypes, seed + epoch), prototypes(zv, config.num_prototypes, seed + epoch))
        order = torch.randperm(n, generator=gen)
        tot_cm = tot_pr = 0.0
        for s in range(0, n, config.batch_size):
            idx = order[s:s + config.batch_size]
            if len(idx) < 2:
                continue
            za, zv = heads(a[idx], v[idx])
            loss_cm = info_nce(za, zv, config.temperature)
            loss_pr = torch.zeros(())
            if protos is not None:
                (ca, sa), (cv, sv) = protos
                loss_pr = proto_loss(za, ca, sa[idx], config.proto_temperature) + proto_loss(zv, cv, sv[idx],
                                                                                             config.proto_temperature)
            loss = loss_cm + config.proto_weight * loss_pr
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_cm += loss_cm.item() * len(idx)
            tot_pr += loss_pr.item() * len(idx)
        if log is not None:
            heads.eval()
            with torch.no_grad():
                za, zv = heads(a, v)
            log.append({"epoch": epoch, "loss_cm": tot_cm / n, "loss_proto": tot_pr / n, "gap": modality_gap(za, zv)})
    heads.eval()
    return heads


@torch.no_grad()
def embed(heads: ProjectionHeads, audio: np.ndarray, visual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised stage-1 embeddings (N, dim) of pooled features audio (N, Ca), visual (N, Cv)."""
    heads.eval()
    za, zv = heads(torch.as_tensor(audio, dtype=torch.float32), torch.as_tensor(visual, dtype=torch.float32))
    return za.numpy(), zv.numpy()
