"""Data modules of the four audio-visual tasks, their decoders and the shared batch contract.

Importing this package imports every DataModule subclass, so LightningCLI ``class_path``
shorthands (``avmoe.datamodules.AVEDataModule`` or just ``AVEDataModule``) resolve.
"""

from .audio import LogMel, LogMelConfig
from .ave import AVE_CATEGORIES, BACKGROUND, NUM_CLASSES, AVEDataModule, AVEDataset, read_ave_list, segment_labels
from .avsbench import AVSBenchDataModule
from .base import AVDataModule, ClipDataset, PlannedDataset, resize_frames, worker_init
from .batch import SkippedSample, batch_size, collate
from .decoding import DecodeError, decord_available, read_audio, read_frames
from .llp import LLPDataModule
from .musicavqa import MusicAVQADataModule
from .sampling import EpochSampler, ResumableDataLoader, SeededItems

__all__ = [
    "AVE_CATEGORIES",
    "BACKGROUND",
    "NUM_CLASSES",
    "AVDataModule",
    "AVEDataModule",
    "AVEDataset",
    "AVSBenchDataModule",
    "ClipDataset",
    "DecodeError",
    "EpochSampler",
    "LLPDataModule",
    "LogMel",
    "LogMelConfig",
    "MusicAVQADataModule",
    "PlannedDataset",
    "ResumableDataLoader",
    "SeededItems",
    "SkippedSample",
    "batch_size",
    "collate",
    "decord_available",
    "read_audio",
    "read_ave_list",
    "read_frames",
    "resize_frames",
    "segment_labels",
    "worker_init",
]

from .multitask import MultitaskDataModule, TaskSampler, task_probabilities  # noqa: E402

__all__ += ["MultitaskDataModule", "TaskSampler", "task_probabilities"]
