"""LightningModules: the shared base and one module per task."""

from avmoe.tasks.ave import AVETask
from avmoe.tasks.base import AVTask, OptimConfig, StepRecord

__all__ = ["AVTask", "AVETask", "OptimConfig", "StepRecord"]
