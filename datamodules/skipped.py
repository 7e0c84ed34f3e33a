"""Book-keeping of clips skipped under ``on_decode_error="skip"``, across DDP ranks and resumes.

Every rank decodes its own shard, so each rank sees different broken clips. A rank records what its batches
dropped (:meth:`SkippedClips.record`); :meth:`SkippedClips.sync` gathers every rank's new records at a point all
ranks reach (epoch end, evaluation end, checkpoint), after which every rank holds the same totals and rank 0
names the new files in one warning. Without DDP a record is reported at once.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SkippedClips:
    """Skipped clips: ``clips`` (path -> reason, every rank) and ``count`` (skipped samples, every rank)."""

    def __init__(self) -> None:
        self.clips: dict[str, str] = {}
        self.count = 0
        self._pending: list[tuple[str, str]] = []  # this rank's records since the last sync (DDP only)

    def record(self, skipped: list[tuple[str, str]]) -> None:
        """Add the ``(path, reason)`` pairs a batch dropped on this rank."""
        if not skipped:
            return
        if _distributed():
            self._pending.extend(skipped)
        else:
            self._merge([list(skipped)])

    def sync(self) -> None:
        """Gather every rank's records since the last sync (a collective: call it on every rank at once)."""
        if not _distributed():
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._pending)
        self._pending = []
        self._merge([list(map(tuple, part)) for part in gathered])

    def _merge(self, per_rank: list[list[tuple[str, str]]]) -> None:
        new: dict[str, str] = {}
        for records in per_rank:
            self.count += len(records)
            new.update({path: reason for path, reason in records if path not in self.clips})
        if new:
            self.clips.update(new)
            listing = "; ".join(f"{path} ({reason})" for path, reason in new.items())
            rank_zero_warn(f"Skipped {len(new)} clip(s) that failed to decode (on_decode_error='skip'; "
                           f"{len(self.clips)} distinct, {self.count} skipped samples so far): {listing}")

    def state_dict(self) -> dict[str, Any]:
        return {"clips": dict(self.clips), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clips = {str(k): str(v) for k, v in dict(state.get("clips") or {}).items()}
        self.count = int(state.get("count", 0))
        self._pending = []
