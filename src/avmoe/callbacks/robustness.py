"""Robustness evaluation under Lightning: the setting of a validate / test / predict run, and the sweep.

- :class:`RobustEval` installs an :class:`~avmoe.robustness.EvalSetting` for ``validate`` / ``test`` /
  ``predict`` (never during ``fit``): the task applies it to every batch (``AVTask.eval_setting``) and the
  eval Datasets corrupt their waveform (:mod:`avmoe.robustness.data`); the setting is written next to the
  metrics (``metrics/robustness_setting.json``) so every number says which condition produced it.
- :func:`run_sweep` re-runs the test loop once per setting of a sweep and writes ``metrics/robustness.json``
  (clean + each setting, the task's metrics, relative drops) and TensorBoard curves ``robustness/<metric>/<series>``
  (the CLI: events in ``<run folder>/robustness/``)
  (metric vs severity / radius / rate, step = position in the series with step 0 = clean), grouped per metric in
  the Custom Scalars tab.

Attacks need gradients inside the test loop: the Trainer must run with ``inference_mode=False`` (the CLI sets it
when a setting has an attack).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from avmoe.files import write_json_atomic
from avmoe.robustness.data import install_wave_transform
from avmoe.robustness.setting import EvalSetting, WaveCorruption, as_setting
from avmoe.robustness.sweep import SweepItem, as_items, result_row, robustness_table

STAGE_SPLITS = {"validate": ("val",), "test": ("test",), "predict": ("test",)}


class RobustEval(Callback):
    """Evaluate under ``setting`` (missing modality, corruption, attack) in validate / test / predict runs.

    Args:
        setting: the condition; None evaluates clean.
        dirpath: folder for ``robustness_setting.json`` (the CLI passes ``<run folder>/metrics``); None: no file.
    """

    def __init__(self, setting: Optional[EvalSetting] = None, dirpath: Optional[str] = None) -> None:
        self.setting = as_setting(setting)
        self.dirpath = Path(dirpath) if dirpath else None
        self._previous: Optional[EvalSetting] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in STAGE_SPLITS or self.setting is None:
            return
        self._previous = getattr(pl_module, "eval_setting", None)
        pl_module.eval_setting = self.setting
        if self.setting.audio_corruption != "none":
            if trainer.datamodule is None:
                raise ValueError("audio corruptions act in the Dataset's log-mel front end: pass a datamodule")
            for dm in _members(trainer.datamodule):
                install_wave_transform(dm, self._transform(dm), STAGE_SPLITS[stage])
        if self.dirpath is not None and trainer.is_global_zero:
            write_json_atomic(self.dirpath / "robustness_setting.json",
                              {"stage": stage, "setting": self.setting.as_dict()}, sort_keys=True)

    def _transform(self, datamodule: Any) -> WaveCorruption:
        return WaveCorruption(self.setting, int(datamodule.audio.sample_rate))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in STAGE_SPLITS or self.setting is None:
            return
        pl_module.eval_setting = self._previous
        if self.setting.audio_corruption != "none" and trainer.datamodule is not None:
            for dm in _members(trainer.datamodule):
                install_wave_transform(dm, None, STAGE_SPLITS[stage])


def _members(datamodule: Any) -> list[Any]:
    """The task DataModules behind ``datamodule``: itself, or the members of a multitask DataModule."""
    members = getattr(datamodule, "tasks", None)
    return list(members.values()) if isinstance(members, dict) else [datamodule]


@contextmanager
def _without(trainer: Trainer, kinds: tuple[type, ...]) -> Iterator[None]:
    """Temporarily remove callbacks of ``kinds`` (the per-split metrics files must keep the clean test)."""
    removed = [c for c in trainer.callbacks if isinstance(c, kinds)]
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, kinds)]
    try:
        yield
    finally:
        trainer.callbacks = trainer.callbacks + removed


def _test_metrics(trainer: Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def run_sweep(trainer: Trainer, model: LightningModule, datamodule: Any, items: list[SweepItem], path: str | Path,
              clean: Optional[dict[str, float]] = None, tensorboard_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Test once per setting of ``items`` and write the table to ``path`` (rank zero) and the figure.

    Args:
        trainer: the Trainer (``inference_mode=False`` when a setting attacks).
        model: the task, holding the weights to evaluate.
        datamodule: its data.
        items: the sweep series.
        path: the JSON file (``<run folder>/metrics/robustness.json``).
        clean: metrics of the clean test if it already ran (the CLI's own test); else it runs first.
        tensorboard_dir: folder of the figure's TensorBoard events (the CLI: ``<run folder>/robustness``);
            None: the Trainer's logger, if it is a TensorBoard one.

    Returns:
        The table written.
    """
    from avmoe.callbacks.metrics_json import MetricsJSON  # noqa: PLC0415

    items = as_items(items)
    probe = next((c for c in trainer.callbacks if isinstance(c, RobustEval)), None)
    if probe is None:
        probe = RobustEval()
        trainer.callbacks.append(probe)
    original, record = probe.setting, probe.dirpath
    probe.dirpath = None  # robustness_setting.json describes the plain test run, not the sweep's rows
    try:
        if clean is None:
            probe.setting = None
            trainer.test(model, datamodule=datamodule, verbose=False)
            clean = _test_metrics(trainer)
        rows = [result_row("clean", None, None, None, clean, clean)]
        with _without(trainer, (MetricsJSON,)):
            for item in items:
                for value, setting in item.settings():
                    rank_zero_info(f"robustness sweep: {item.name} {item.vary or ''}={value}")
                    probe.setting = setting
                    trainer.test(model, datamodule=datamodule, verbose=False)
                    rows.append(result_row(item.name, item.vary, value, setting, _test_metrics(trainer), clean))
    finally:
        probe.setting, probe.dirpath = original, record
    table = robustness_table(rows, type(model).__name__)
    if trainer.is_global_zero:
        write_json_atomic(Path(path), table, indent=1)
        log_figure(trainer, rows, tensorboard_dir)
    return table


def log_figure(trainer: Trainer, rows: list[dict[str, Any]], folder: Optional[str | Path] = None) -> None:
    """TensorBoard curves: ``robustness/<metric>/<series>`` with step 0 = clean and step i = the i-th value of
    the series, plus a Custom Scalars layout with one multi-line chart per metric; into ``folder`` when given
    (``test`` runs have no logger, so the fit's TensorBoard events stay untouched), else the Trainer's logger."""
    if folder is not None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        writer = SummaryWriter(log_dir=str(folder))
    else:
        writer = getattr(trainer.logger, "experiment", None)
    if writer is None or not hasattr(writer, "add_custom_scalars"):
        return
    clean, series = rows[0]["metrics"], {}
    for row in rows[1:]:
        series.setdefault(row["name"], []).append(row)
    metrics = [k for k in clean if not k.endswith("/loss")]
    for name, group in series.items():
        for key in metrics:
            tag = f"robustness/{key.removeprefix('test/')}/{name}"
            writer.add_scalar(tag, clean[key], 0)
            for step, row in enumerate(group, start=1):
                if key in row["metrics"]:
                    writer.add_scalar(tag, row["metrics"][key], step)
    layout = {"robustness": {key.removeprefix("test/"): ["Multiline", [f"robustness/{key.removeprefix('test/')}/"]]
                             for key in metrics}}
    writer.add_custom_scalars(layout)
    writer.flush()
    if folder is not None:
        writer.close()
