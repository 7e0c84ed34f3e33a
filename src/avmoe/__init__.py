"""avmoe: a PyTorch Lightning framework for audio-visual learning with the AVMoE backbone."""

__version__ = "0.1.0"
