"""Several task DataModules combined for joint training: one task per step, drawn the same on every rank.

Lightning's ``fit`` cannot iterate loaders one after another (``CombinedLoader(mode="sequential")`` is refused by
the fit loop), so training uses :class:`TaskSampler`, a resumable iterable that yields one task's batch per step:

- the task of each step is a function of ``(seed, epoch, step)`` only, so every rank runs the same task at every
  step (a head trained on a fraction of the ranks would be averaged with zeros) and a resumed run draws what the
  uninterrupted one drew;
- each task's batches come from its own DataModule's train loader (its sharding, seeding and mid-epoch resume);
  a loader that runs out starts its next pass over the task's data (its own epoch counter);
- an epoch is a fixed number of steps (``steps_per_epoch``), the same on every rank.

Task probabilities (:func:`task_probabilities`): ``proportional`` to the train set sizes, ``temperature``
(``p_t ~ n_t^(1/T)``; T=1 proportional, large T uniform), or ``round_robin`` (a fixed cycle). ``max_passes`` caps
how many passes per epoch any task may make over its train set (UniMax-style: the smallest set is not repeated
endlessly); the probability mass a capped task gives up goes to the others in proportion.

Validation/test/predict return one loader per task (Lightning iterates them sequentially; the dataloader index
is the position in ``tasks``).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule

from .base import AVDataModule
from .sampling import ResumableDataLoader, mix_seed

Sampling = Literal["proportional", "temperature", "round_robin"]
TASK = "task"


def task_probabilities(
    sizes: dict[str, int], sampling: Sampling = "temperature", temperature: float = 2.0,
    max_passes: Optional[float] = None, steps: Optional[int] = None, batch_sizes: Optional[dict[str, int]] = None,
) -> dict[str, float]:
    """Per-task probability of being drawn at a step.

    ``max_passes`` (with ``steps`` and ``batch_sizes``) caps ``steps * p_t * batch_t / n_t`` at ``max_passes`` by
    water-filling: capped tasks get exactly their cap, the rest share what is left in their original ratios.
    """
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ValueError(f"multitask: every task needs a non-empty train set, got sizes {sizes}")
    if sampling == "proportional":
        raw = {t: float(n) for t, n in sizes.items()}
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"multitask: temperature must be > 0, got {temperature}")
        raw = {t: float(n) ** (1.0 / temperature) for t, n in sizes.items()}
    elif sampling == "round_robin":
        raw = {t: 1.0 for t in sizes}
    else:
        raise ValueError(f"multitask: sampling must be proportional, temperature or round_robin, got {sampling!r}")
    total = sum(raw.values())
    p = {t: v / total for t, v in raw.items()}
    if max_passes is None:
        return p
    if steps is None or batch_sizes is None:
        raise ValueError("multitask: max_passes needs steps and batch_sizes")
    cap = {t: max_passes * sizes[t] / (steps * batch_sizes[t]) for t in sizes}
    if sum(min(c, 1.0) for c in cap.values()) < 1.0 - 1e-9:
        raise ValueError(f"multitask: max_passes={max_passes} cannot fill {steps} steps per epoch (each task at its "
                         f"cap covers {sum(cap.values()):.3f} of them); raise max_passes or lower steps_per_epoch")
    if sampling == "round_robin":
        over = [t for t in sizes if p[t] > cap[t] + 1e-12]
        if over:
            raise ValueError(f"multitask: round_robin would exceed max_passes={max_passes} on {over}")
        return p
    fixed: dict[str, float] = {}
    while True:
        free = {t: raw[t] for t in sizes if t not in fixed}
        left = 1.0 - sum(fixed.values())
        share = {t: left * v / sum(free.values()) for t, v in free.items()}
        over = [t for t, v in share.items() if v > cap[t]]
        if not over:
            return {t: fixed.get(t, share.get(t, 0.0)) for t in sizes}
        for t in over:
            fixed[t] = cap[t]


def draw_tasks(names: list[str], probs: dict[str, float], steps: int, seed: int, epoch: int,
               round_robin: bool = False) -> list[str]:
    """The task of every step of ``epoch``: a function of ``(seed, epoch)`` only."""
    if round_robin:
        offset = epoch % len(names)  # rotate so no task always opens the epoch
        return [names[(offset + i) % len(names)] for i in range(steps)]
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
    weights = torch.tensor([probs[n] for n in names], dtype=torch.float64)
    return [names[i] for i in torch.multinomial(weights, steps, replacement=True, generator=gen).tolist()]


class _TaskSamplerIterator:
    def __init__(self, sampler: "TaskSampler") -> None:
        self.sampler = sampler
        self.order: Optional[list[str]] = None

    def __iter__(self) -> "_TaskSamplerIterator":
        return self

    def __len__(self) -> int:
        return len(self.sampler)

    def __next__(self) -> dict[str, Any]:
        s = self.sampler
        if self.order is None:  # lazily, once the epoch is known (Lightning calls iter() before the epoch starts)
            self.order = s._start_epoch()
        if s.step >= len(self.order):
            raise StopIteration
        name = self.order[s.step]
        batch = s._next_batch(name)
        s.step += 1
        batch[TASK] = name
        return batch


class TaskSampler:
    """One task's batch per step from per-task resumable loaders (see the module docstring).

    Implements ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``), so the fit loop checkpoints it
    mid-epoch: the epoch, the steps taken, each task's pass count and its loader's position.
    """

    def __init__(self, loaders: dict[str, ResumableDataLoader], probs: dict[str, float], steps: int, seed: int,
                 epoch_fn: Any, round_robin: bool = False) -> None:
        self.loaders, self.probs, self.steps, self.seed = loaders, probs, steps, seed
        self.epoch_fn, self.round_robin = epoch_fn, round_robin
        self.names = list(loaders)
        self.epoch, self.step = 0, 0
        self.passes = {n: 0 for n in self.names}
        self.drawn = {n: 0 for n in self.names}  # batches drawn per task this epoch (diagnostics)
        self._iters: dict[str, Iterator[Any]] = {}
        self._resume: Optional[tuple[int, int]] = None
        # Restored loader states not started since the restore: a loader reports its position only once it
        # starts, so until then its state is the restored one (else a second save would lose the position).
        self._pending: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> _TaskSamplerIterator:
        return _TaskSamplerIterator(self)

    def _start_epoch(self) -> list[str]:
        self.epoch = int(self.epoch_fn())
        # Task loaders continue their passes across epochs (their iterators are kept): epochs are step counts.
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        order = draw_tasks(self.names, self.probs, self.steps, self.seed, self.epoch, self.round_robin)
        self.step = skip
        self.drawn = {n: order[:skip].count(n) for n in self.names}
        return order

    def _next_batch(self, name: str) -> Any:
        loader = self.loaders[name]
        for _ in range(2):
            if name not in self._iters:
                sampler = loader.epoch_sampler
                if sampler is not None:
                    sampler.set_epoch(self.passes[name])
                self._iters[name] = iter(loader)
                self._pending.pop(name, None)
            try:
                batch = next(self._iters[name])
                self.drawn[name] += 1
                return batch
            except StopIteration:
                del self._iters[name]
                self.passes[name] += 1
        raise RuntimeError(f"multitask: the {name} train loader yields no batch")

    def state_dict(self) -> dict[str, Any]:
        epoch, step = self._resume if self._resume is not None else (self.epoch, self.step)
        return {"epoch": epoch, "step": step, "passes": dict(self.passes), "steps": self.steps,
                "loaders": {n: self._pending.get(n) or l.state_dict() for n, l in self.loaders.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("loaders", {})) != self.names or state.get("steps") != self.steps:
            raise ValueError(f"multitask: the checkpoint's task sampler ({list(state.get('loaders', {}))}, "
                             f"{state.get('steps')} steps) differs from this one ({self.names}, {self.steps} steps)")
        self.passes = {n: int(v) for n, v in state["passes"].items()}
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["loaders"][name])
        self._pending = {n: dict(state["loaders"][n]) for n in self.names}
        self._iters = {}
        self._resume = (int(state["epoch"]), int(state["step"]))


class MultitaskDataModule(LightningDataModule):
    """Per-task DataModules combined: task sampling for training, one loader per task for evaluation.

    Args:
        tasks: the member DataModules by task name (the names of the multitask module's tasks).
        sampling: ``proportional``, ``temperature`` or ``round_robin`` task sampling.
        temperature: T of temperature sampling (``p ~ n^(1/T)``).
        steps_per_epoch: training steps per epoch; None = one pass over every task's train loader (the sum).
        max_passes: cap on the passes per epoch over any task's train set (None: no cap).
        seed: seed of the task draws; None uses the run's ``seed_everything`` value, else 0.
    """

    def __init__(
        self,
        tasks: dict[str, AVDataModule],
        sampling: Sampling = "temperature",
        temperature: float = 2.0,
        steps_per_epoch: Optional[int] = None,
        max_passes: Optional[float] = None,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("multitask: give at least one DataModule under data.init_args.tasks")
        self.tasks = dict(tasks)
        self.sampling, self.temperature = sampling, temperature
        self.steps_per_epoch, self.max_passes, self.seed = steps_per_epoch, max_passes, seed
        self.probabilities: dict[str, float] = {}

    def _members(self) -> None:
        for dm in self.tasks.values():
            dm.trainer = self.trainer

    def prepare_data(self) -> None:
        for dm in self.tasks.values():
            dm.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self._members()
        for dm in self.tasks.values():
            dm.setup(stage)

    def train_dataloader(self) -> TaskSampler:
        self._members()
        loaders = {name: dm.train_dataloader() for name, dm in self.tasks.items()}
        steps = self.steps_per_epoch or sum(len(l) for l in loaders.values())
        sizes = {name: dm.dataset_size("train") for name, dm in self.tasks.items()}
        world = self.trainer.world_size if self.trainer is not None else 1
        batch_sizes = {name: dm.batch_size * world for name, dm in self.tasks.items()}  # samples per step, all ranks
        self.probabilities = task_probabilities(sizes, self.sampling, self.temperature, self.max_passes, steps,
                                                batch_sizes)
        seed = self.seed if self.seed is not None else next(iter(self.tasks.values())).data_seed
        epoch_fn = (lambda: self.trainer.current_epoch) if self.trainer is not None else (lambda: 0)
        return TaskSampler(loaders, self.probabilities, steps, seed, epoch_fn, self.sampling == "round_robin")

    def _eval(self, split: str) -> dict[str, Any]:
        self._members()
        return {name: getattr(dm, f"{split}_dataloader")() for name, dm in self.tasks.items()}

    def val_dataloader(self) -> dict[str, Any]:
        return self._eval("val")

    def test_dataloader(self) -> dict[str, Any]:
        return self._eval("test")

    def predict_dataloader(self) -> dict[str, Any]:
        return self._eval("predict")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch's own DataModule pops and records its skipped clips."""
        name = batch.get(TASK) if isinstance(batch, dict) else None
        if name is None:
            names = list(self.tasks)
            name = names[dataloader_idx] if dataloader_idx < len(names) else None
        return self.tasks[name].on_after_batch_transfer(batch, dataloader_idx) if name in self.tasks else batch

    def state_dict(self) -> dict[str, Any]:
        return {name: dm.state_dict() for name, dm in self.tasks.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, dm in self.tasks.items():
            if name in state_dict:
                dm.load_state_dict(state_dict[name])
