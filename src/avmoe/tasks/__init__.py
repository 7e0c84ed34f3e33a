"""LightningModules: the shared base and one module per task."""

from avmoe.tasks.ave import AVETask
from avmoe.tasks.avqa import AVQATask
from avmoe.tasks.avs import AVSLossConfig, AVSTask
from avmoe.tasks.avvp import AVVPLossConfig, AVVPTask
from avmoe.tasks.base import AVTask, OptimConfig, StepRecord
from avmoe.tasks.multitask import MultitaskModule

__all__ = ["AVTask", "AVETask", "AVQATask", "AVSLossConfig", "AVSTask", "AVVPLossConfig", "AVVPTask", "MultitaskModule", "OptimConfig", "StepRecord"]
