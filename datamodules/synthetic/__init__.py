"""Synthetic datasets in the official on-disk layouts (for tests, smoke runs and benchmarks).

Command line: ``python -m avmoe.datamodules.synthetic {ave,llp,avs_s4,avs_ms3,musicavqa} --root DIR``.
"""

from .ave import write_ave_release
from .avsbench import write_avsbench_release
from .imbalanced import write_imbalanced_ave_release
from .llp import write_llp_release
from .media import write_mp4, write_wav
from .musicavqa import write_musicavqa_release

__all__ = [
    "write_ave_release",
    "write_avsbench_release",
    "write_imbalanced_ave_release",
    "write_llp_release",
    "write_mp4",
    "write_musicavqa_release",
    "write_wav",
]
