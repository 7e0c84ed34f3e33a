"""Convert the original HTS-AT AudioSet checkpoint (``sed_model.*`` keys) into the ``ClapAudioModel`` layout.

Key mapping (RetroCirce/HTS-Audio-Transformer ``model/htsat.py`` names), original -> ``audio_encoder.``-prefixed ClapAudioModel key:

- ``bn0.*`` -> ``batch_norm.*``; ``patch_embed.{proj,norm}.*`` and ``norm.*`` keep their names;
- ``layers.s.blocks.j.norm1`` -> ``layernorm_before``; ``norm2`` -> ``layernorm_after``;
- ``attn.qkv`` (Linear C -> 3C, rows ordered q, k, v) -> ``attention.self.{query,key,value}``;
- ``attn.proj`` -> ``attention.output.dense``;
- ``attn.relative_position_bias_table`` / ``relative_position_index`` -> ``attention.self.*`` (same layout);
- ``mlp.fc1`` -> ``intermediate.dense``; ``mlp.fc2`` -> ``output.dense``;
- ``layers.s.downsample.{reduction,norm}`` keep their names (both put the LayerNorm(4C) before the reduction);
- dropped: the STFT/log-mel front-end weights, ``attn_mask`` buffers (recomputed at run time), ``tscam_conv``,
  ``head`` (AVMoE uses neither).

Valid only when every stage grid is at least the window size (true for HTS-AT tiny: 64/32/16/8 vs window 8):
otherwise the original builds a smaller bias table than the library can hold.
"""

from __future__ import annotations

import os
import re

from torch import Tensor, nn

from avmoe.files import load_checkpoint_safely

PREFIX = "sed_model."
TARGET = "audio_encoder."
# Original sub-keys dropped on purpose (front-end, heads, recomputed masks).
_DROP = re.compile(r"^(spectrogram_extractor\.|logmel_extractor\.|tscam_conv\.|head\.)|\.attn_mask$")
_RENAMES = [
    (re.compile(r"^bn0\."), "batch_norm."),
    (re.compile(r"\.norm1\."), ".layernorm_before."),
    (re.compile(r"\.norm2\."), ".layernorm_after."),
    (re.compile(r"\.attn\.proj\."), ".attention.output.dense."),
    (re.compile(r"\.attn\.relative_position_"), ".attention.self.relative_position_"),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]
_QKV = re.compile(r"^(?P<block>.+)\.attn\.qkv\.(?P<kind>weight|bias)$")


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the ``sed_model.`` entries without their prefix; a dict without the prefix is taken as is."""
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return dict(sd)


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return TARGET + key


def convert_htsat_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an original HTS-AT state dict (with or without the ``sed_model.`` prefix) to ClapAudioModel keys.

    Unknown keys are passed through (renamed by the generic rules) so that a strict load reports them.
    """
    out: dict[str, Tensor] = {}
    for key, value in _strip_prefix(sd).items():
        if _DROP.search(key):
            continue
        qkv = _QKV.match(key)
        if qkv is not None:
            base = _rename(qkv["block"]) + ".attention.self."
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{qkv['kind']}"] = part.clone()  # rows [0:C]=q, [C:2C]=k, [2C:3C]=v
            continue
        out[_rename(key)] = value
    return out


TRUST_OPT_IN = "--model.init_args.backbone.audio.trust_checkpoint true (AudioEncoderConfig.trust_checkpoint)"


def load_htsat_checkpoint(path: str | os.PathLike, model: nn.Module, trust: bool = False) -> None:
    """Load ``HTSAT_AudioSet_Saved_*.ckpt`` (a dict with ``state_dict``) into a ``ClapAudioModel``, strictly.

    The file is unpickled with :func:`avmoe.files.load_checkpoint_safely`: tensors and plain containers only (a
    PyTorch Lightning checkpoint of the original RetroCirce/HTS-Audio-Transformer training, saved with
    ``pytorch_lightning==1.5.9`` per its ``requirements.txt``, keeps its state dict, optimizer and scheduler
    states and callback states in such types); ``trust=True`` allows full pickle, with a warning.

    Raises ``FileNotFoundError`` for a missing file, :class:`avmoe.files.UnsafeCheckpointError` for a file that
    needs more than tensors (without ``trust``), and ``RuntimeError`` listing missing/unexpected keys when the
    checkpoint does not match the model's architecture.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HTS-AT checkpoint not found: {path}")
    ckpt = load_checkpoint_safely(path, trust=trust, opt_in=TRUST_OPT_IN)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise RuntimeError(f"{path}: expected a dict with a 'state_dict' entry, got {type(ckpt).__name__}")
    converted = convert_htsat_state_dict(sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or shapes:
        raise RuntimeError(
            f"HTS-AT checkpoint {path} does not match the audio encoder config.\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(shapes)}): "
            + str([(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in shapes])
        )
    model.load_state_dict(converted, strict=True)
