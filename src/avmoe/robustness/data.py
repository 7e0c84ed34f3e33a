"""Loader side of a robustness setting: the waveform corruption inside each eval Dataset's log-mel front end.

Batches carry log-mels computed in the DataLoader workers, so a waveform-space corruption must run there:
:func:`install_wave_transform` sets ``LogMel.wave_transform`` on the front end(s) of the built Datasets before
the loaders start (workers receive it with the Dataset). The transform is seeded by the sample index that
``ClipDataset.__getitem__`` publishes (``avmoe.datamodules.audio.SAMPLE_INDEX``).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch.utils.data import Subset

from avmoe.datamodules.audio import LogMel, WaveTransform


def _unwrap(dataset: Any) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def front_ends(dataset: Any) -> Iterator[LogMel]:
    """The :class:`LogMel` objects a Dataset computes its audio with (its own, or its clip decoder's)."""
    dataset = _unwrap(dataset)
    if isinstance(getattr(dataset, "logmel", None), LogMel):
        yield dataset.logmel
    clips = getattr(dataset, "clips", None)  # MUSIC-AVQA: a ClipStore around a decoder
    decoder = getattr(clips, "decoder", None)
    if isinstance(getattr(decoder, "logmel", None), LogMel):
        yield decoder.logmel


def wave_transform_problem(dataset: Any) -> Optional[str]:
    """Why a waveform transform cannot act on ``dataset`` (no log-mel front end, or a decoded-clip cache that
    bypasses it), or None."""
    base = _unwrap(dataset)
    if not list(front_ends(base)):
        return f"{type(base).__name__} computes no log-mel from a waveform (no LogMel front end)"
    if getattr(getattr(base, "clips", None), "cache", None) is not None:
        return (f"{type(base).__name__} reads log-mels from its decoded-clip cache, which a waveform corruption "
                "cannot reach: evaluate with --data.init_args.cache_dir=null")
    return None


def install_wave_transform(datamodule: Any, transform: Optional[WaveTransform], splits: tuple[str, ...]) -> None:
    """Set (or with None clear) the waveform transform of the given splits' Datasets.

    Raises:
        ValueError: a transform is requested but a split's Dataset cannot apply it (named, with the reason).
    """
    datasets = getattr(datamodule, "_datasets", None)
    if datasets is None or not hasattr(datamodule, "dataset"):
        if transform is None:
            return
        raise ValueError(f"audio corruptions need an avmoe AVDataModule, got {type(datamodule).__name__}")
    for split in splits:
        dataset = datamodule.dataset(split)
        if transform is not None:
            problem = wave_transform_problem(dataset)
            if problem:
                raise ValueError(f"cannot corrupt the {split} audio waveform: {problem}")
        for front_end in front_ends(dataset):
            front_end.wave_transform = transform
