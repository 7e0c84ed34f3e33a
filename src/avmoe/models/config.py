"""Typed configuration of the AVMoE backbone.

These dataclasses are the config schema: LightningCLI/jsonargparse reads their fields (and the attribute
docstrings) for ``--help`` and YAML, and they are stored in checkpoints as plain hyper-parameters.
Defaults are paper scale (Swin-V2-L/12 @192 + HTS-AT tiny, the official AVE adapter configuration);
every official per-task variant (the run scripts of yingchengy/AVMOE, collected in :mod:`avmoe.models.presets`) is a set of field values, not a code fork.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class VisualEncoderConfig:
    """Frozen Swin-V2 visual encoder (``transformers.Swinv2Model``)."""

    pretrained: Optional[str] = None
    """Local folder saved by ``Swinv2Model.save_pretrained`` (never downloaded). None: random init + warning."""
    image_size: int = 192
    """Input resolution the encoder was built for; frames of another size are resized (bicubic) on the device."""
    patch_size: int = 4
    """Side of the square patches the Swin-V2 patch embedding cuts (4 for every released Swin-V2)."""
    embed_dim: int = 192
    """Stage-0 channel width C; stage widths double per stage (Swin-V2-L: 192)."""
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    """Transformer blocks per stage (Swin-V2-L: 2, 2, 18, 2)."""
    num_heads: list[int] = field(default_factory=lambda: [6, 12, 24, 48])
    """Attention heads per stage."""
    window_size: int = 12
    """Side of the local attention windows, in tokens."""
    drop_path_rate: float = 0.1
    """Only active when ``train_mode`` is true (the official code leaves the encoder in train mode)."""
    train_mode: bool = False
    """Reproduce the official quirk of running the frozen encoder in train mode (drop-path active)."""
    trainable: bool = False
    """Unfreeze the encoder weights (the released AVS-S4 script leaves HTS-AT trainable; see avs_s4.yaml)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean used to normalise frames in [0, 1] (ImageNet)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation used to normalise frames (ImageNet)."""


@dataclass
class AudioEncoderConfig:
    """Frozen HTS-AT audio encoder (the audio tower of ``transformers.ClapAudioModel``)."""

    pretrained: Optional[str] = None
    """Local folder saved by ``ClapAudioModel.save_pretrained`` (or a ``ClapModel`` folder: the audio tower is taken)."""
    htsat_checkpoint: Optional[str] = None
    """Original HTS-AT AudioSet checkpoint (``HTSAT_AudioSet_Saved_1.ckpt``, ``sed_model.*`` keys): converted on load.
    Read with ``torch.load(weights_only=True)``: a file that needs more than tensors is refused (see
    ``trust_checkpoint``)."""
    trust_checkpoint: bool = False
    """Unpickle ``htsat_checkpoint`` in full (``weights_only=False``), with a warning. A crafted pickle runs code:
    only for a file from a source you trust, and only if the safe load refused it."""
    num_mel_bins: int = 64
    """Mel bins of the input log-mel spectrogram (must equal the data's ``audio.n_mels``)."""
    spec_size: int = 256
    """Side of the square spectrogram image HTS-AT folds each segment's log-mel into."""
    patch_size: int = 4
    """Side of the square patches of the HTS-AT patch embedding."""
    hidden_size: int = 96
    """Stage-0 width (``patch_embeds_hidden_size``); stage widths double per stage."""
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    """Transformer blocks per HTS-AT stage."""
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Attention heads per HTS-AT stage."""
    window_size: int = 8
    """Side of the local attention windows, in tokens."""
    drop_path_rate: float = 0.1
    """Stochastic-depth rate of the last block (linear from 0), on both residual branches as the official HTS-AT;
    only active in train mode."""
    spec_augment: bool = True
    """Official HTS-AT SpecAugment (2 time stripes < 64 frames, 2 mel stripes < 8 bins); only active in train mode."""
    train_mode: bool = False
    """Reproduce the official quirk: encoder in train mode, i.e. SpecAugment, drop-path on both residual branches
    (``drop_path_rate``) and BatchNorm statistics updates, as ``AVMOE/AVE/nets/net_trans_v3.py``."""
    trainable: bool = False
    """Unfreeze the encoder weights (official AVS-S4 behaviour)."""
    mixup_alpha: float = 0.0
    """Training-time log-mel mixup of every 1-s segment with a partner, ``lam * x + (1 - lam) * x_partner``,
    ``lam ~ Beta(alpha, alpha)`` per segment; labels are not mixed (official AVVP/AVS/AVQA: 0.5; 0 = off)."""
    mixup_partner: Literal["frames", "clips"] = "frames"
    """``frames``: the partner comes from the reversed (B*T) segment batch, as the official ``do_mixup`` on the
    flattened input (with batch 1 segment t meets segment T-1-t of the same clip); ``clips``: the same segment
    of the clip at the reversed batch position (a clip meets another clip whenever B > 1)."""


@dataclass
class AdapterConfig:
    """MoE adapters inserted between the two encoders (AVMoE paper, section 3; yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` ``MoEAdapter``)."""

    enabled: bool = True
    """False: no adapters at all (the stepped backbone then equals the two library forwards)."""
    num_cross_experts: int = 1
    """Cross-modal adapter experts (CMA) per MoE module."""
    num_uni_experts: int = 1
    """Unimodal adapter experts (UA) per MoE module."""
    uni_expert: Literal["linear", "param_free", "mha_frames", "latent"] = "linear"
    """UA variant: linear bottleneck (AVE, AVQA), parameter-free token attention (AVVP), multi-head attention
    across frames (the S4 layout quirk), latent-token self-attention (MS3)."""
    num_latents: int = 32
    """Latent tokens T of the cross-modal (and ``latent`` unimodal) experts."""
    reduction: int = 8
    """Bottleneck ratio r: width C -> C/r -> C."""
    conv_groups: int = 2
    """Groups of the 1x1 bottleneck convolutions."""
    use_bn: bool = True
    """BatchNorm after the bottleneck convolutions (AVE)."""
    audio_gate: bool = True
    """Zero-initialised output gate on audio-side experts (video side is always gated)."""
    num_skip: int = 2
    """Stage s has no adapters when ``num_skip > 1 and (s + 1) % num_skip == 0`` (2: skip stages 1 and 3)."""
    router_hidden: list[int] = field(default_factory=lambda: [128, 32])
    """Hidden widths of the router MLP (input: both modalities' pooled tokens, output: one logit per expert)."""
    router_noise_std: float = 0.0
    """Gaussian noise on router logits in training (0.01 in the official AVS scripts)."""
    load_balance_weight: float = 0.0
    """Weight of KL(uniform || mean routing) summed over MoE modules (1.0 AVVP, 0.01 MS3)."""
    mha_heads: int = 4
    """Heads of the ``mha_frames`` unimodal expert's attention across frames."""
    mha_dropout: float = 0.2
    """Attention dropout of the ``mha_frames`` unimodal expert."""


@dataclass
class AVMoEConfig:
    """The whole backbone: two frozen encoders stepped in lockstep with trainable MoE adapters."""

    visual: VisualEncoderConfig = field(default_factory=VisualEncoderConfig)
    """The Swin-V2 visual encoder."""
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    """The HTS-AT audio encoder."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The MoE adapters between the two encoders."""
    gradient_checkpointing: bool = False
    """Recompute each block in backward, frozen unpaired blocks included (saves activation memory, ~30% more
    compute)."""
    fast: bool = True
    """Fused window attention (``scaled_dot_product_attention``) with the frozen position bias, shift mask and
    q/k/v weights cached once per block, and the ``linear`` unimodal experts of each MoE module sharing one
    LayerNorm and one down-projection GEMM (``models/moe_batched.py``), and the cross-modal experts reading the
    mapped other modality in factored form where that takes fewer FLOPs (``models/moe_factored.py``), and on a
    CPU in fp32 the frozen encoders' GEMMs through oneDNN instead of the default BLAS
    (``models/backbones/gemm.py``); equal to the library forward and the experts one by one up to float rounding,
    same parameters. False: the library blocks and the experts as they are (the reference the fast path is
    tested against)."""
    compile: bool = False
    """Regional ``torch.compile`` of the block types (window attention, Swin MLP half, MoE adapter), compiled once
    per shape and reused across blocks; eager with a warning where unsupported. On in ``trainer/gpu.yaml``; off
    on a CPU, where it measured slower than eager at paper scale (bench/BENCHMARKS.md)."""
