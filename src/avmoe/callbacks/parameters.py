"""Parameter breakdown at the start of fit: frozen / trainable per part, printed and written to the run folder.

Replaces Lightning's model summary (whose FLOPs column reads 0 without an ``example_input_array``): one row per
part of an AVMoE task (visual encoder, audio encoder, MoE adapters, the rest of the backbone, head, auxiliary
uni-modal heads), which is what "how many parameters do I train" needs, written as ``parameters.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from avmoe.files import write_json_atomic

# State-dict prefix -> part name; the first match wins (more specific prefixes first).
PARTS: tuple[tuple[str, str], ...] = (
    ("backbone.visual_encoder.", "visual encoder"),
    ("backbone.audio_encoder.", "audio encoder"),
    ("backbone.adapters.", "MoE adapters"),
    ("backbone.", "backbone (other)"),
    ("head.", "head"),
    ("unimodal_heads.", "uni-modal heads"),
)


def parameter_breakdown(module: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "frozen": n}}`` plus ``"total"``; parts not in :data:`PARTS` by top-level name."""
    out: dict[str, dict[str, int]] = {}
    for name, param in module.named_parameters():
        part = next((label for prefix, label in PARTS if name.startswith(prefix)), name.split(".")[0])
        counts = out.setdefault(part, {"trainable": 0, "frozen": 0})
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    out["total"] = {k: sum(c[k] for c in out.values()) for k in ("trainable", "frozen")}
    return out


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def format_breakdown(breakdown: dict[str, dict[str, int]]) -> str:
    rows = [("part", "trainable", "frozen", "total")]
    rows += [(part, _human(c["trainable"]), _human(c["frozen"]), _human(c["trainable"] + c["frozen"]))
             for part, c in breakdown.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


class ParameterSummary(ModelSummary):
    """At fit start (rank 0): the frozen / trainable breakdown per part, printed and saved.

    Args:
        path: the JSON file (the CLI sets ``<run folder>/parameters.json``); None only prints.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(max_depth=1)
        self.path = Path(path) if path else None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        breakdown = parameter_breakdown(pl_module)
        rank_zero_info(f"Parameters of {type(pl_module).__name__}:\n{format_breakdown(breakdown)}")
        if self.path is not None:
            write_json_atomic(self.path, breakdown)
