"""Known-benign warnings of the stack, filtered once for the command line (each explained here).

- "Found N module(s) in eval mode at the start of training": by design, frozen pretrained encoders run in eval
  mode (no drop-path, no BatchNorm statistics updates); ``backbone.{visual,audio}.train_mode: true`` reproduces
  the official train-mode quirk. The parameter breakdown printed at fit start says which parts are frozen.
- "isinstance(treespec, LeafSpec) is deprecated": Lightning 2.6's ``utilities/_pytree.py`` with torch >= 2.10;
  nothing a user can change.
- "Experiment logs directory ... exists and is not empty" (CSVLogger): the run folder is shared with TensorBoard
  and the run's records on purpose; a fresh fit in a used folder is refused (``run.overwrite``) before this.
- Lightning's "Tip: ... install litlogger" advertisement (a log record, not a warning).
"""

from __future__ import annotations

import logging
import warnings

BENIGN_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Experiment logs directory .* exists and is not empty",
)
_TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_known_warnings() -> None:
    """Install the filters (idempotent)."""
    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    log = logging.getLogger(_TIP_LOGGER)
    if not any(isinstance(f, _DropTip) for f in log.filters):
        log.addFilter(_DropTip())
