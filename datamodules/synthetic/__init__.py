"""Synthetic datasets in the official on-disk layouts (for tests, smoke runs and benchmarks).

"""

from .ave import write_ave_release
from .media import write_mp4, write_wav

__all__ = [
    "write_ave_release",
    "write_mp4",
    "write_wav",
]
