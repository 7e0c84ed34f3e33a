"""Frozen encoders from ``transformers``, stepped stage by stage and block by block.

``swin``: Swin-V2 visual encoder (``Swinv2Model``) with an attention/MLP split of each block.
``htsat``: HTS-AT audio encoder (the audio tower of ``ClapAudioModel``).
``convert_htsat``: key mapping from the original HTS-AT AudioSet checkpoint.
"""

from . import htsat, swin
from .convert_htsat import convert_htsat_state_dict, load_htsat_checkpoint
from .htsat import build_htsat, clap_audio_config
from .swin import attn_half, build_swin, mlp_half, swin_config

__all__ = [
    "attn_half",
    "build_htsat",
    "build_swin",
    "clap_audio_config",
    "convert_htsat_state_dict",
    "htsat",
    "load_htsat_checkpoint",
    "mlp_half",
    "swin",
    "swin_config",
]
