"""Pooled audio / visual features of the unlabelled pool, from the AVMoE backbone, cached in the run folder.

One feature pair per pool *unit* (a sample of the split, or for MUSIC-AVQA one question per video): the
backbone's per-frame features (``BackboneOutput.audio`` (B, T, Ca), ``.visual`` (B, T, Cv)) averaged over the T
frames, in eval mode (frozen encoders; adapters as initialised or from ``checkpoint``).

Sharding: the units are cut into fixed batches ``[0:b], [b:2b], ...`` and batch k goes to rank ``k mod W``, so a
batch holds the same samples whatever the number of processes and the features are identical bit for bit on 1 and
2 processes. Each rank flushes its finished batches to ``features/shard<r>of<W>.pt`` every ``flush_every`` batches
(a restarted run skips them), then the shards are gathered by unit position and rank zero writes
``features/pool.pt``, which later runs load when the unit IDs match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from avmoe.datamodules.batch import AUDIO_MASK, VISUAL_MASK, collate
from avmoe.datamodules.sampling import SeededItems

from .gather import gather_batches, rank_batches, world

POOL_FILE = "pool.pt"


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def pooled_features(backbone: nn.Module, batch: dict, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Ca), (B, Cv) frame-averaged features of one batch; a sample without audio or video is an error."""
    for key, name in ((AUDIO_MASK, "audio"), (VISUAL_MASK, "visual")):
        mask = batch.get(key)
        if mask is not None and bool((mask == 0).any()):
            missing = [ids[i] for i in torch.nonzero(mask == 0).flatten().tolist()]
            raise ValueError(f"the pool needs both modalities; sample(s) {missing} have no {name} "
                             f"(modality mask 0): drop them from the split or fill the modality")
    feats = backbone(batch["video"], batch["audio"])
    audio, visual = feats.audio.float().mean(1), feats.visual.float().mean(1)  # (B, Ca), (B, Cv)
    for name, x in (("audio", audio), ("visual", visual)):
        bad = (~torch.isfinite(x).all(1)) | (x.abs().sum(1) == 0)
        if bool(bad.any()):
            raise ValueError(f"{name} features of sample(s) {[ids[i] for i in torch.nonzero(bad).flatten().tolist()]} "
                             "are all zero or not finite (a missing or silent modality?)")
    return audio.cpu(), visual.cpu()


def embed_pool(backbone: nn.Module, dataset: Dataset, positions: np.ndarray, ids: Sequence[str], cache_dir: Path,
               batch_size: int = 8, num_workers: int = 0, seed: int = 0, device: str | torch.device = "cpu",
               flush_every: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Features (U, Ca), (U, Cv) of the U pool units; unit u is ``dataset[positions[u]]`` with ID ``ids[u]``.

    Loads ``cache_dir/pool.pt`` when its IDs equal ``ids``; otherwise embeds this rank's batches (resuming its
    shard file), gathers all ranks (every rank returns the full arrays) and rank zero writes ``pool.pt``.
    """
    ids = [str(i) for i in ids]
    if len(ids) == 0:
        raise ValueError("the pool is empty: the split has no samples to select from")
    if len(positions) != len(ids):
        raise ValueError(f"{len(positions)} positions for {len(ids)} pool IDs")
    cache_dir = Path(cache_dir)
    pool_path = cache_dir / POOL_FILE
    if pool_path.is_file():
        cached = torch.load(pool_path, weights_only=True)
        if list(cached["ids"]) == ids:
            return cached["audio"].numpy(), cached["visual"].numpy()
    world_size, rank = world()
    shard_path = cache_dir / f"shard{rank}of{world_size}.pt"
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch number -> (audio, visual)
    if shard_path.is_file():
        shard = torch.load(shard_path, weights_only=True)
        if list(shard["ids"]) == ids and shard["batch_size"] == batch_size:
            done = {int(k): (a, v) for k, a, v in zip(shard["batches"], shard["audio"], shard["visual"])}
    n_batches = (len(ids) + batch_size - 1) // batch_size
    todo = [k for k in rank_batches(n_batches, rank, world_size) if k not in done]

    def flush() -> None:
        keys = sorted(done)
        _save(shard_path, {"ids": ids, "batch_size": batch_size, "batches": keys,
                           "audio": [done[k][0] for k in keys], "visual": [done[k][1] for k in keys]})

    if todo:
        backbone.eval().to(device)
        order = [int(positions[u]) for k in todo for u in range(k * batch_size, min((k + 1) * batch_size, len(ids)))]
        loader = DataLoader(SeededItems(Subset(dataset, order), seed), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=collate)
        for step, (k, batch) in enumerate(zip(todo, loader)):
            unit_ids = ids[k * batch_size:(k + 1) * batch_size]
            if batch.get("skipped"):
                raise ValueError(f"pool sample(s) failed to decode: {batch['skipped']} (the pool needs every sample; "
                                 "use on_decode_error=raise to see the first error)")
            batch = {key: val.to(device) if torch.is_tensor(val) else val for key, val in batch.items()}
            done[k] = pooled_features(backbone, batch, unit_ids)
            if (step + 1) % flush_every == 0:
                flush()
        flush()
    audio, visual = gather_batches({k: done[k] for k in rank_batches(n_batches, rank, world_size)}, n_batches)
    if rank == 0:
        _save(pool_path, {"ids": ids, "audio": audio, "visual": visual})
    if world_size > 1:
        dist.barrier()
    return audio.numpy(), visual.numpy()


def load_backbone_weights(backbone: nn.Module, checkpoint: Optional[str], prefix: str = "backbone.") -> None:
    """Load the ``backbone.*`` tensors of a task checkpoint (e.g. stage-1 or fully trained adapters), strictly
    for the adapters (frozen encoder weights may be omitted from checkpoints and are rebuilt from the config)."""
    if not checkpoint:
        return
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"select.checkpoint: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"select.checkpoint {path}: no '{prefix}*' tensors (not an avmoe task checkpoint?)")
    missing, unexpected = backbone.load_state_dict(own, strict=False)
    missing = [k for k in missing if k.startswith("adapters")]
    if missing or unexpected:
        raise ValueError(f"select.checkpoint {path}: missing adapter keys {missing[:10]}, unexpected {unexpected[:10]}")
