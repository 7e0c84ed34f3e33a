"""Shared DataModule and Dataset machinery for the four audio-visual tasks.

Conventions: annotation files are read in ``setup`` on every
process; decoders are opened inside ``__getitem__``; per-sample metadata lives in numpy arrays /
pandas columns (a list of dicts in the Dataset grows worker memory through copy-on-read refcounts,
pytorch/pytorch#13246); workers are seeded with Lightning's ``pl_worker_init_function`` (per worker and rank).

Loaders (``datamodules/sampling.py``): the train order is a function of ``(seed, epoch)`` and the train loader
is checkpointed mid-epoch (exact resume); item randomness is a function of ``(seed, epoch, index)``; under DDP
every rank gets its own shard, and evaluation shards are *not* padded (each sample is evaluated once).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from abc import ABC, abstractmethod
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset

from avmoe._private_api import uses_distributed_sampler

from .audio import SAMPLE_INDEX, LogMelConfig
from .batch import AUDIO_MASK, INDEX, SKIPPED, VISUAL_MASK, SkippedSample, collate
from .decoding import DecodeError, VideoBackend
from .sampling import EpochSampler, ResumableDataLoader, SeededItems
from .skipped import SkippedClips

DecodePolicy = Literal["raise", "skip"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
STAGE_SPLITS: dict[Optional[str], tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


def worker_init(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM/SIGINT ignored, Lightning's per-worker seeding, single-threaded BLAS.

    SLURM, torchrun (``os.killpg``) and Ctrl-C signal the whole process group, workers included. PyTorch's worker
    handler dies on a SIGTERM that does not come from its parent, and the main process then fails with "DataLoader
    worker (pid N) is killed by signal: Terminated" before it can checkpoint. Workers ignore both: the main
    process decides when to stop (``avmoe.callbacks.preemption``) and shuts its workers down (Lightning's
    teardown); a worker whose main process is gone exits by itself (PyTorch's watchdog).

    A forked worker inherits the parent's OpenBLAS thread pool; its spin-waiting threads then
    compete with the other workers for the cores (measured here: a 40-item loader 0.45 s -> 5.7 s,
    minutes under load). Workers are the parallelism, so BLAS gets one thread per worker.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SIG_IGN, not a Python handler: no EINTR inside decoders
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pl_worker_init_function(worker_id, rank=rank)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional (via scikit-learn)
    except ImportError:
        return
    threadpool_limits(1, user_api="blas")


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, size, size)`` uint8, bicubic with antialiasing.

    Square output, as the Swin-V2 encoder expects (aspect ratio is not kept). Interpolation runs on
    float and is rounded and clamped back to uint8 (bicubic overshoots).
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if video.shape[-2:] == (size, size):
        return video.contiguous()
    out = F.interpolate(video.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class ClipDataset(Dataset, ABC):
    """A Dataset of clips whose ``__getitem__`` applies the decode-error policy.

    Subclasses implement :meth:`__len__` and :meth:`load`. ``__getitem__`` adds ``index`` (the
    position in this Dataset) and default modality masks of 1.0 when ``load`` does not set them.

    Args:
        on_decode_error: ``"raise"`` re-raises :class:`DecodeError`; ``"skip"`` returns a
            :class:`SkippedSample` that :func:`~avmoe.datamodules.batch.collate` drops and records.
    """

    def __init__(self, on_decode_error: DecodePolicy = "raise") -> None:
        if on_decode_error not in ("raise", "skip"):
            raise ValueError(f"on_decode_error must be 'raise' or 'skip', got {on_decode_error!r}")
        self.on_decode_error = on_decode_error

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> dict[str, Any]:
        """Decode and return sample ``index`` (a dict following the batch contract)."""

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        index = int(index)
        token = SAMPLE_INDEX.set(index)  # per-clip seeds of waveform transforms (robustness evaluation)
        try:
            sample = self.load(index)
        except DecodeError as err:
            if self.on_decode_error == "raise":
                raise
            return SkippedSample(index=index, path=err.path, reason=err.reason or str(err))
        finally:
            SAMPLE_INDEX.reset(token)
        sample.setdefault(INDEX, torch.tensor(index, dtype=torch.int64))
        sample.setdefault(AUDIO_MASK, torch.tensor(1.0))
        sample.setdefault(VISUAL_MASK, torch.tensor(1.0))
        return sample


class PlannedDataset(Dataset):
    """Iterates ``base`` in the order of ``indices`` (repeats allowed), overriding modality masks.

    ``index`` in each sample stays the base Dataset's index; masks are aligned with ``indices``.
    """

    def __init__(
        self,
        base: Dataset,
        indices: np.ndarray,
        audio_mask: Optional[np.ndarray] = None,
        visual_mask: Optional[np.ndarray] = None,
    ) -> None:
        self.base = base
        self.indices = indices
        self.audio_mask = audio_mask
        self.visual_mask = visual_mask

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Any:
        sample = self.base[int(self.indices[position])]
        if isinstance(sample, SkippedSample):
            return sample
        if self.audio_mask is not None:
            sample[AUDIO_MASK] = torch.tensor(float(self.audio_mask[position]))
        if self.visual_mask is not None:
            sample[VISUAL_MASK] = torch.tensor(float(self.visual_mask[position]))
        return sample


class AVDataModule(LightningDataModule, ABC):
    """Base DataModule of the audio-visual tasks (AVE, LLP/AVVP, AVSBench, MUSIC-AVQA).

    Subclasses implement :meth:`build_dataset`. Batches follow ``avmoe.datamodules.batch``.

    Modality re-sampling: :meth:`set_train_plan` replaces the train order (and per-item modality
    masks) from the next call of ``train_dataloader()`` on; Lightning builds the train loader once
    per fit unless ``Trainer(reload_dataloaders_every_n_epochs=1)`` (or the calling callback
    forces a reload). The plan is part of :meth:`state_dict`, so a resumed run continues with it.

    Args:
        root: dataset root folder (layout per task).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size; None uses ``batch_size``.
        predict_dir: ``predict`` on the ``*.mp4`` files of this folder (your own videos, decoded like the
            dataset's clips; see :mod:`avmoe.datamodules.folder`) instead of the test split. None: the test split.
        num_workers: DataLoader worker processes (0 = decode in the main process).
        image_size: frames are resized to ``image_size x image_size`` in the worker.
        audio: log-mel front end (rate, STFT, mel, segment length, pad tolerance).
        video_backend: frame decoder: ``auto`` (decord, PyAV fallback), ``decord`` or ``pyav``.
        on_decode_error: ``raise`` stops on an undecodable clip; ``skip`` drops it from the batch,
            records it in ``skipped_clips`` / ``num_skipped`` and warns once per file (under DDP: gathered from
            every rank and reported by rank 0, see :meth:`record_skipped`).
        pin_memory: pin host memory; None pins when the trainer runs on a CUDA device.
        persistent_workers: keep workers alive between epochs (only used when ``num_workers > 0``).
        limit_samples: use only the first N samples of every split (smoke runs); None uses all.
        seed: seed of the train order (a function of seed and epoch) and of per-item randomness; None uses
            the run's ``seed_everything`` value (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 2,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        image_size: int = 192,
        audio: LogMelConfig = LogMelConfig(),
        video_backend: VideoBackend = "auto",
        on_decode_error: DecodePolicy = "raise",
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        limit_samples: Optional[int] = None,
        seed: Optional[int] = None,
        predict_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        # A checkpoint's hparams hold ``audio`` as a dict (see below); accept it back.
        audio = audio if isinstance(audio, LogMelConfig) else LogMelConfig(**dict(audio))
        self.save_hyperparameters()
        # Plain dict, so checkpoints load under torch.load(weights_only=True) (as avmoe.tasks does).
        self.save_hyperparameters({**self.hparams, "audio": dataclasses.asdict(audio)})
        self.root = root
        self.batch_size = batch_size
        self.predict_dir = predict_dir
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.audio = audio
        self.video_backend = video_backend
        self.on_decode_error = on_decode_error
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.limit_samples = limit_samples
        self.seed = seed
        self.skipped = SkippedClips()
        """Clips dropped under ``on_decode_error="skip"``, gathered over DDP ranks (``datamodules/skipped.py``)."""
        self._datasets: dict[str, Dataset] = {}
        self._train_plan: Optional[dict[str, Optional[np.ndarray]]] = None

    # ------------------------------------------------------------------ datasets

    @abstractmethod
    def build_dataset(self, split: str) -> Dataset:
        """Build the Dataset of ``split`` (``train``/``val``/``test``); called from ``setup``."""

    def build_folder_dataset(self, folder: str) -> Dataset:
        """The Dataset of the mp4 files in ``folder`` (``predict_dir``); tasks that support it override this."""
        raise ValueError(f"{type(self).__name__} does not support data.predict_dir (the AVE, LLP, AVSBench and "
                         "MUSIC-AVQA DataModules do)")

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            return  # the folder's dataset is built by predict_dataloader; the release root is not needed
        for split in STAGE_SPLITS.get(stage, SPLITS):
            self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        """The (possibly ``limit_samples``-truncated) Dataset of ``split``, built on first use."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._datasets:
            ds = self.build_dataset(split)
            if self.limit_samples is not None and self.limit_samples < len(ds):
                # A prefix keeps position i == base index i, so `index` and train plans stay valid.
                ds = Subset(ds, range(self.limit_samples))
            self._datasets[split] = ds
        return self._datasets[split]

    def dataset_size(self, split: str) -> int:
        """Number of samples in ``split`` (after ``limit_samples``)."""
        return len(self.dataset(split))

    # ------------------------------------------------------------------ loaders

    @property
    def data_seed(self) -> int:
        """Seed of the train order and per-item randomness (``seed``, else ``PL_GLOBAL_SEED``, else 0)."""
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _distribution(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` to shard over; ``(1, 0)`` without DDP or with
        ``Trainer(use_distributed_sampler=False)``."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        if not uses_distributed_sampler(trainer):
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return {
            "num_workers": workers,
            "collate_fn": collate,
            "pin_memory": self._pin_memory(),
            "persistent_workers": self.persistent_workers and workers > 0,
            "worker_init_fn": functools.partial(worker_init, rank=rank) if workers > 0 else None,
        }

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        if self._train_plan is not None:
            self._check_plan_range(self._train_plan["indices"])
            dataset = PlannedDataset(dataset, **self._train_plan)
        world, rank = self._distribution()
        seed = self.data_seed
        # The sampler shards for DDP itself (a DistributedSampler subclass: Lightning leaves it in place).
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return ResumableDataLoader(SeededItems(dataset, seed), batch_size=self.batch_size, sampler=sampler,
                                   drop_last=False, generator=torch.Generator(), **self._loader_kwargs())

    def _eval_loader(self, split: str, dataset: Optional[Dataset] = None) -> DataLoader:
        dataset = self.dataset(split) if dataset is None else dataset
        world, rank = self._distribution()
        sampler = None
        if world > 1:
            # Not padded (Lightning's default DistributedSampler repeats samples to even out the ranks): every
            # sample is evaluated once; ranks differ by at most one sample (PerSampleMetric gathers by index).
            if len(dataset) < world:  # every rank must run at least one batch (DDP syncs buffers on the first)
                raise ValueError(f"the {split} split has {len(dataset)} sample(s), fewer than the {world} processes")
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(SeededItems(dataset, self.data_seed), batch_size=self.eval_batch_size or self.batch_size,
                          shuffle=False, sampler=sampler, drop_last=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir is not None:
            return self._eval_loader(f"predict_dir {self.predict_dir}", self.build_folder_dataset(self.predict_dir))
        return self._eval_loader("test")

    # ------------------------------------------------------------------ skipped clips

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pop ``batch["skipped"]``, record the clips and warn (rank zero) the first time each is seen."""
        if isinstance(batch, dict):
            self.record_skipped(batch.pop(SKIPPED, None) or [])
        return batch

    def record_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """Count skipped ``(path, reason)`` pairs; warn (rank zero) about files not seen before.

        Under DDP they are reported when :meth:`sync_skipped` gathers the ranks' records (the CLI's
        :class:`~avmoe.callbacks.metrics_json.MetricsJSON` does at epoch and evaluation ends, and every checkpoint).
        """
        self.skipped.record(skipped)

    def sync_skipped(self) -> None:
        """Gather every rank's skipped clips (a collective under DDP with ``on_decode_error="skip"``)."""
        if self.on_decode_error == "skip":
            self.skipped.sync()

    @property
    def skipped_clips(self) -> dict[str, str]:
        """Clips dropped under ``on_decode_error="skip"``: path -> reason (all ranks, as of the last sync)."""
        return self.skipped.clips

    @property
    def num_skipped(self) -> int:
        """Skipped samples (a clip skipped every epoch counts every time; all ranks, as of the last sync)."""
        return self.skipped.count

    # ------------------------------------------------------------------ modality re-sampling

    @property
    def train_plan(self) -> Optional[dict[str, Optional[np.ndarray]]]:
        """The current train plan (``indices``, ``audio_mask``, ``visual_mask``) or None."""
        return self._train_plan

    def set_train_plan(
        self,
        indices: Optional[np.ndarray],
        audio_mask: Optional[np.ndarray] = None,
        visual_mask: Optional[np.ndarray] = None,
    ) -> None:
        """Iterate the train split over ``indices`` with per-item modality masks.

        Args:
            indices: base train indices in the order to visit them (shuffled again by the
                loader); repeats allowed. None restores the plain train Dataset.
            audio_mask: per-item audio mask aligned with ``indices`` (1 present, 0 removed);
                None keeps each sample's own mask.
            visual_mask: same for the visual modality.
        """
        if indices is None:
            if audio_mask is not None or visual_mask is not None:
                raise ValueError("set_train_plan: masks need indices")
            self._train_plan = None
            return
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"set_train_plan: indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        plan = {"indices": idx.astype(np.int64), "audio_mask": None, "visual_mask": None}
        for name, mask in (("audio_mask", audio_mask), ("visual_mask", visual_mask)):
            if mask is not None:
                arr = np.asarray(mask, dtype=np.float32)
                if arr.shape != idx.shape:
                    raise ValueError(f"set_train_plan: {name} has shape {arr.shape}, indices {idx.shape}")
                plan[name] = arr
        if "train" in self._datasets:
            self._check_plan_range(plan["indices"])
        self._train_plan = plan

    def _check_plan_range(self, indices: np.ndarray) -> None:
        size = self.dataset_size("train")
        if len(indices) and (indices.min() < 0 or indices.max() >= size):
            raise ValueError(f"train plan indices must lie in [0, {size}); got [{indices.min()}, {indices.max()}]")

    def state_dict(self) -> dict[str, Any]:
        # Tensors (not numpy) so checkpoints load under torch.load(weights_only=True).
        plan = None
        if self._train_plan is not None:
            plan = {k: None if v is None else torch.from_numpy(v.copy()) for k, v in self._train_plan.items()}
        # Lightning calls this on every rank in save_checkpoint, so the gather is safe here: a checkpoint holds the
        # skips of every rank up to its step, and a resumed run goes on counting from there.
        if self.on_decode_error != "skip":
            return {"train_plan": plan}
        self.sync_skipped()
        return {"train_plan": plan, "skipped": self.skipped.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped.load_state_dict(state_dict.get("skipped") or {})
        plan = state_dict.get("train_plan")
        if plan is None:
            self.set_train_plan(None)
            return
        arrays = {k: None if v is None else np.asarray(v) for k, v in plan.items()}
        self.set_train_plan(arrays["indices"], arrays.get("audio_mask"), arrays.get("visual_mask"))
