"""Plain ``torch.nn`` models (never imports Lightning): the AVMoE backbone, its config and output contract."""

from .avmoe import AVMoEBackbone
from .config import AdapterConfig, AudioEncoderConfig, AVMoEConfig, VisualEncoderConfig
from .outputs import BackboneOutput
from .presets import PAPER_CONFIGS, paper_adapter, paper_config, tiny_config

__all__ = [
    "AVMoEBackbone",
    "AVMoEConfig",
    "AdapterConfig",
    "AudioEncoderConfig",
    "BackboneOutput",
    "PAPER_CONFIGS",
    "VisualEncoderConfig",
    "paper_adapter",
    "paper_config",
    "tiny_config",
]
