"""Robustness evaluation: missing modalities, corruptions and L2 attacks (model side, no Lightning).

- :mod:`~avmoe.robustness.corruptions`: waveform / pixel corruptions at severities 1-5 (AVRobustBench, ImageNet-C);
- :mod:`~avmoe.robustness.attacks`: FGM / L2-PGD on one or both modalities (CRMT ``rob_test.py``);
- :mod:`~avmoe.robustness.setting`: :class:`EvalSetting`, the condition every task applies to eval batches;
- :mod:`~avmoe.robustness.data`: the waveform part inside the loaders;
- :mod:`~avmoe.robustness.sweep`: sweep series and the ``metrics/robustness.json`` table.

The Lightning side (callback, sweep runner) is :mod:`avmoe.callbacks.robustness`.
"""

from avmoe.robustness.setting import EvalSetting, apply_setting, as_setting
from avmoe.robustness.sweep import RobustnessConfig, SweepItem

__all__ = ["EvalSetting", "RobustnessConfig", "SweepItem", "apply_setting", "as_setting"]
