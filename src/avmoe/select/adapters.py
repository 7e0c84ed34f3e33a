"""Optional stage 1 *through the backbone*: train the AVMoE adapters (and projection heads) self-supervised.

The same loss as :mod:`avmoe.select.stage1` (symmetric InfoNCE + per-modality prototype loss), but on the pooled
backbone features of decoded clips, so the gradients reach the MoE adapters; the frozen encoders stay frozen.
Prototypes for epoch e come from k-means on the embeddings seen during epoch e - 1 (all ranks gathered), so the
first epoch is pairing-only; this saves a full extra pass per epoch (ProtoNCE recomputes them with one).

Runs on the Lightning Fabric of ``lightning select`` (any number of processes; each rank trains on its shard of a
seeded shuffle, gradients all-reduced by DDP). The trained backbone weights go to ``<run_dir>/stage1_adapters.pt``
and a rerun loads them instead of training again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from avmoe.datamodules.batch import INDEX, collate
from avmoe.datamodules.sampling import SeededItems
from avmoe.models.avmoe import AVMoEBackbone

from .stage1 import ProjectionHeads, Stage1Config, info_nce, modality_gap, proto_loss, prototypes

WEIGHTS_FILE = "stage1_adapters.pt"


def feature_widths(backbone: AVMoEBackbone) -> tuple[int, int]:
    """(Ca, Cv) of ``BackboneOutput.audio`` / ``.visual``: the last stage widths of HTS-AT and Swin-V2."""
    cfg = backbone.config
    return cfg.audio.hidden_size * 2 ** (len(cfg.audio.depths) - 1), cfg.visual.embed_dim * 2 ** (len(cfg.visual.depths) - 1)


class AdapterStage1(nn.Module):
    """Backbone + projection heads; ``forward(batch) -> (z_a, z_v)`` normalised (B, dim)."""

    def __init__(self, backbone: AVMoEBackbone, config: Stage1Config) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = ProjectionHeads(*feature_widths(backbone), config.dim, config.hidden)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        feats = self.backbone(batch["video"], batch["audio"])
        return self.heads(feats.audio.float().mean(1), feats.visual.float().mean(1))  # pooled (B, C) -> (B, dim)


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def train_adapters(fabric: Any, backbone: AVMoEBackbone, dataset: Dataset, positions: np.ndarray, epochs: int,
                   config: Stage1Config, run_dir: Path, batch_size: int = 8, num_workers: int = 0, lr: float = 1e-4,
                   seed: int = 0, log: Optional[list[dict]] = None) -> AVMoEBackbone:
    """Train ``backbone``'s adapters for ``epochs`` epochs on the pool clips ``dataset[positions]``; returns it.

    ``log`` receives per epoch ``epoch``, ``loss`` (rank-zero mean) and ``gap`` (of the embeddings seen that epoch).
    """
    path = Path(run_dir) / WEIGHTS_FILE
    if path.is_file():
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return backbone
    if not any(p.requires_grad for p in backbone.parameters()):
        raise ValueError("select.adapter_epochs > 0 but the backbone has no trainable parameters (adapter.enabled?)")
    torch.manual_seed(seed)
    model = AdapterStage1(backbone, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=config.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)
    loader = DataLoader(SeededItems(Subset(dataset, [int(p) for p in positions]), seed), batch_size=batch_size,
                        shuffle=True, num_workers=num_workers, collate_fn=collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    loader = fabric.setup_dataloaders(loader)
    n = len(positions)
    unit_of = {int(p): u for u, p in enumerate(positions)}  # dataset index (the sample's ``index``) -> pool unit
    protos: Optional[tuple] = None
    for epoch in range(epochs):
        model.train()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        total = 0.0
        for batch in loader:
            units = [unit_of[int(i)] for i in batch[INDEX].tolist()]
            za, zv = model(batch)
            loss = info_nce(za, zv, config.temperature)
            if protos is not None and config.proto_weight > 0:
                (ca, sa), (cv, sv) = protos
                ok = sa[units] >= 0  # units the previous epoch did not see have no assignment
                if bool(ok.any()):
                    ok_dev = ok.to(za.device)
                    loss = loss + config.proto_weight * (
                        proto_loss(za[ok_dev], ca.to(za), sa[units][ok].to(za.device), config.proto_temperature)
                        + proto_loss(zv[ok_dev], cv.to(zv), sv[units][ok].to(zv.device), config.proto_temperature))
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            total += loss.item()
            for u, a, v in zip(units, za.detach().float().cpu().numpy(), zv.detach().float().cpu().numpy()):
                seen[u] = (a, v)
        merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for part in _gather(seen):
            merged.update(part)
        keys = sorted(merged)
        za_all = torch.as_tensor(np.stack([merged[k][0] for k in keys]))
        zv_all = torch.as_tensor(np.stack([merged[k][1] for k in keys]))
        if config.proto_weight > 0 and len(keys) >= config.num_prototypes:
            ca, la = prototypes(za_all, config.num_prototypes, seed + epoch)
            cv, lv = prototypes(zv_all, config.num_prototypes, seed + epoch)
            sa = torch.full((n,), -1, dtype=torch.int64)  # -1: not seen this epoch, no prototype target
            sv = torch.full((n,), -1, dtype=torch.int64)
            sa[keys], sv[keys] = la, lv
            protos = ((ca, sa), (cv, sv))
        if log is not None:
            log.append({"epoch": epoch, "loss": total / max(1, len(loader)), "gap": modality_gap(za_all, zv_all)})
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({k: v.cpu() for k, v in backbone.state_dict().items()}, tmp)
        os.replace(tmp, path)
    fabric.barrier()
    return backbone
