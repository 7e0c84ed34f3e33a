"""AVMoEBackbone: frozen Swin-V2 and HTS-AT stepped in lockstep with MoE adapters (yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` ``MMIL_Net.forward_swin``).

Per stage s, with Lv visual and La audio blocks (Lv % La == 0, r = Lv // La), audio block k is paired with visual
block r*k + r - 1 (3k+2 for 18/6, j<->j for equal counts); unpaired visual blocks run whole. A paired block with
adapters is::

    ra1 = moe_a1(Fa, Fv); rv1 = moe_v1(Fv, Fa)          # both read the block inputs
    Fv = attn_half(Fv) + rv1; Fa = audio_block(Fa) + ra1
    ra2 = moe_a2(Fa, Fv); rv2 = moe_v2(Fv, Fa)          # both read the mid states
    Fv = mlp_half(Fv) + rv2; Fa = Fa + ra2

Stages with ``num_skip > 1 and (s + 1) % num_skip == 0`` have no adapters. After each stage the visual tokens are
recorded (before patch merging), then the visual and the audio patch merging run. After the last stage the Swin
final LayerNorm is applied to the visual stream only (the audio stream has no final norm, as official).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backbones import gemm, htsat, swin
from .backbones.windows import FrozenCache
from .compile import RegionalCompile
from .config import AVMoEConfig
from .mixup import mix_log_mel
from .moe import MoEAdapter
from .moe_batched import batched_moe_forward
from .outputs import BackboneOutput

Grid = tuple[int, int]


class PairedAdapters(nn.Module):
    """The four MoE modules of one paired block: audio/visual side, before (p1) and after (p2) the attention half.

    Audio-side modules (``a1``, ``a2``) own their token mapping from the visual stream; visual-side (``v1``, ``v2``)
    own theirs from the audio stream.
    """

    def __init__(self, config: AVMoEConfig, dims: tuple[int, int], tokens: tuple[int, int]) -> None:
        super().__init__()
        (cv, ca), (nv, na) = dims, tokens
        cfg = config.adapter
        self.a1 = MoEAdapter(ca, cv, na, nv, cfg, gated=cfg.audio_gate)
        self.v1 = MoEAdapter(cv, ca, nv, na, cfg, gated=True)  # video side is always gated (zero at init)
        self.a2 = MoEAdapter(ca, cv, na, nv, cfg, gated=cfg.audio_gate)
        self.v2 = MoEAdapter(cv, ca, nv, na, cfg, gated=True)

    def audio_modules(self) -> list[MoEAdapter]:
        return [self.a1, self.a2]

    def visual_modules(self) -> list[MoEAdapter]:
        return [self.v1, self.v2]


def _clear_caches_after_load(module: "AVMoEBackbone", _keys: Any) -> None:
    """``load_state_dict`` post-hook (a module-level function: the backbone must pickle for ``ddp_spawn``)."""
    module.clear_caches()


class AVMoEBackbone(nn.Module):
    """Two frozen encoders stepped block by block with MoE adapters between them.

    ``forward(video (B, T, 3, H, W) uint8 or float in [0, 1], audio (B, T, F, mels) log-mel) -> BackboneOutput``.
    """

    def __init__(self, config: AVMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = swin.build_swin(config.visual)
        self.audio_encoder = htsat.build_htsat(config.audio)
        self._check_pairing()
        self._freeze()
        size = swin.image_size(self.visual_encoder)
        self.image_size = (size, size)
        # Non-persistent: normalisation constants are config, not weights (keeps checkpoints clean).
        self.register_buffer("pixel_mean", torch.tensor(config.visual.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.visual.std).view(1, 3, 1, 1), persistent=False)
        self.adapters = nn.ModuleDict()  # str(stage) -> ModuleList[PairedAdapters]; absent for skipped stages
        if config.adapter.enabled:
            self._build_adapters()
        # Frozen-weight constants of the fast path (not state: rebuilt on demand, dropped when weights load).
        self._frozen_cache = FrozenCache()
        self.register_load_state_dict_post_hook(_clear_caches_after_load)
        self._compiled = {
            name: RegionalCompile(fn, config.compile, name)
            for name, fn in [("swin.window_core", swin.window_core), ("htsat.window_core", htsat.window_core),
                             ("swin.mlp_half", swin.mlp_half), ("moe_adapter", _moe_call),
                             ("moe_adapter.batched", batched_moe_forward)]
        }
        # Part of the fast path: the MoE experts' shared work done once (models/moe_batched.py).
        # Only read when ``config.fast`` is on; False times / compares the fast attention alone (bench/train_step.py).
        self.batch_experts = True
        # Part of the batched experts: the cross-modal experts read the mapped other modality in factored form
        # (models/moe_factored.py); None = where it costs fewer FLOPs, True/False force it (bench, tests).
        self.factor_token_map: Optional[bool] = None
        # Part of the fast path: the frozen encoders' GEMMs (and, with no gradient wanted, the factored token
        # mixing) through oneDNN on a CPU (models/backbones/gemm.py); False: torch's default BLAS (bench, tests).
        self.onednn_gemm = True
        self.train(self.training)

    # ----------------------------------------------------------------------------------------------- construction
    @property
    def _vstages(self) -> nn.ModuleList:
        return self.visual_encoder.encoder.layers

    @property
    def _astages(self) -> nn.ModuleList:
        return self.audio_encoder.audio_encoder.layers

    def _check_pairing(self) -> None:
        if len(self._vstages) != len(self._astages):
            raise ValueError(f"encoders have {len(self._vstages)} vs {len(self._astages)} stages; lockstep needs equal")
        for s, (vs, as_) in enumerate(zip(self._vstages, self._astages)):
            if len(vs.blocks) % len(as_.blocks):
                raise ValueError(
                    f"stage {s}: {len(vs.blocks)} visual blocks is not a multiple of {len(as_.blocks)} audio blocks"
                )

    def _freeze(self) -> None:
        self.visual_encoder.requires_grad_(self.config.visual.trainable)
        self.audio_encoder.requires_grad_(self.config.audio.trainable)

    def _adapted(self, stage: int) -> bool:
        skip = self.config.adapter.num_skip
        return self.config.adapter.enabled and not (skip > 1 and (stage + 1) % skip == 0)

    def _build_adapters(self) -> None:
        vdims, adims = swin.stage_dims(self.visual_encoder), htsat.stage_dims(self.audio_encoder)
        vgrids, agrids = swin.stage_grids(self.visual_encoder), htsat.stage_grids(self.audio_encoder)
        for s, astage in enumerate(self._astages):
            if not self._adapted(s):
                continue
            tokens = (vgrids[s][0] * vgrids[s][1], agrids[s][0] * agrids[s][1])
            positions = [PairedAdapters(self.config, (vdims[s], adims[s]), tokens) for _ in astage.blocks]
            self.adapters[str(s)] = nn.ModuleList(positions)

    # ---------------------------------------------------------------------------------------------- public helpers
    def clear_caches(self) -> None:
        """Drop the cached frozen-weight constants (done after every ``load_state_dict``; call it after editing
        frozen encoder weights in place by hand)."""
        self._frozen_cache.clear()

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in calls that compiled a new shape (0 when ``compile`` is off or unsupported)."""
        return sum(c.compile_seconds for c in self._compiled.values())

    @property
    def feature_dims(self) -> dict[str, Any]:
        """Widths, token counts and grids the task heads are built from."""
        vgrids, agrids = swin.stage_grids(self.visual_encoder), htsat.stage_grids(self.audio_encoder)
        return {
            "visual": swin.stage_dims(self.visual_encoder)[-1],
            "audio": htsat.stage_dims(self.audio_encoder)[-1],
            "visual_stages": swin.stage_dims(self.visual_encoder),
            "visual_tokens": vgrids[-1][0] * vgrids[-1][1],
            "audio_tokens": agrids[-1][0] * agrids[-1][1],
            "visual_grids": vgrids,
        }

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per modality, by module ownership (no name matching).

        Audio: every parameter of the audio-side MoE modules -- *including* their token mapping and router, which
        read the visual stream: the module exists to modify the audio stream, so it is owned by audio. Visual: the
        visual-side MoE modules likewise. An encoder's own weights are added only when it is ``trainable``.
        """
        groups: dict[str, list[nn.Parameter]] = {"audio": [], "visual": []}
        for positions in self.adapters.values():
            for pos in positions:
                groups["audio"] += [p for m in pos.audio_modules() for p in m.parameters()]
                groups["visual"] += [p for m in pos.visual_modules() for p in m.parameters()]
        if self.config.audio.trainable:
            groups["audio"] += list(self.audio_encoder.parameters())
        if self.config.visual.trainable:
            groups["visual"] += list(self.visual_encoder.parameters())
        return groups

    def train(self, mode: bool = True) -> "AVMoEBackbone":
        """Adapters follow ``mode``; frozen encoders stay in eval (no drop-path, dropout, BN statistics updates)
        unless their ``train_mode`` reproduces the official always-train quirk."""
        super().train(mode)
        if mode and not self.config.visual.train_mode:
            self.visual_encoder.eval()
        if mode and not self.config.audio.train_mode:
            self.audio_encoder.eval()
        return self

    def preprocess_video(self, video: Tensor) -> Tensor:
        """(B, T, 3, H, W) uint8 or float in [0, 1] -> normalised (B*T, 3, S, S) float, all on the device."""
        x = video.flatten(0, 1)  # (M, 3, H, W)
        x = x.float().div_(255.0) if not x.is_floating_point() else x.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode_visual_plain(self, video: Tensor) -> Tensor:
        """Final Swin tokens (B, T, Nv, Cv) without any adapter (e.g. AVQA negatives): the library forward, or its
        blocks through the fast path when ``fast`` is on."""
        b, t = video.shape[:2]
        if not self.config.fast:
            tokens = self.visual_encoder(pixel_values=self.preprocess_video(video)).last_hidden_state
            return tokens.view(b, t, *tokens.shape[1:])
        tokens, hw = swin.embed(self.visual_encoder, self.preprocess_video(video))  # (M, N0, C0)
        for stage in self._vstages:
            for vblk in stage.blocks:
                tokens = self._visual_block(vblk, tokens, hw)
            tokens, hw = swin.downsample(stage, tokens, hw)  # the last stage has none
        tokens = swin.final_norm(self.visual_encoder, tokens)
        return tokens.view(b, t, *tokens.shape[1:])

    # ----------------------------------------------------------------------------------------------------- forward
    def forward(self, video: Tensor, audio: Tensor) -> BackboneOutput:
        b, t = video.shape[:2]
        if tuple(audio.shape[:2]) != (b, t):
            raise ValueError(f"video has (B, T) = {(b, t)} but audio has {tuple(audio.shape[:2])}")
        fv, hw_v = swin.embed(self.visual_encoder, self.preprocess_video(video))  # (M, Nv0, Cv0)
        if self.training and self.config.audio.mixup_alpha > 0:
            audio, _ = mix_log_mel(audio, self.config.audio.mixup_alpha, self.config.audio.mixup_partner)
        fa, hw_a = htsat.embed(self.audio_encoder, audio.reshape(b * t, 1, *audio.shape[2:]))  # (M, Na0, Ca0)
        stages: list[Tensor] = []
        grids: list[Grid] = []
        weights: list[Tensor] = []
        lbs: list[Tensor] = []
        last = len(self._vstages) - 1
        for s in range(last + 1):
            fv, fa = self._run_stage(s, fv, fa, hw_v, hw_a, weights, lbs)
            if s == last:
                fv = swin.final_norm(self.visual_encoder, fv)
            stages.append(fv.view(b, t, *fv.shape[1:]))  # (B, T, N_s, C_s), before patch merging
            grids.append(hw_v)
            fv, hw_v = swin.downsample(self._vstages[s], fv, hw_v)
            fa, hw_a = htsat.downsample(self._astages[s], fa, hw_a)
        visual_tokens = stages[-1]
        audio_tokens = fa.view(b, t, *fa.shape[1:])  # (B, T, Na, Ca)
        return BackboneOutput(
            visual=visual_tokens.mean(2),
            audio=audio_tokens.mean(2),
            visual_tokens=visual_tokens,
            audio_tokens=audio_tokens,
            visual_stages=stages,
            visual_grids=grids,
            router_weights=weights,
            aux_loss=self._aux_loss(lbs, fv),
        )

    def _aux_loss(self, lbs: list[Tensor], ref: Tensor) -> Tensor:
        weight = self.config.adapter.load_balance_weight
        if weight == 0 or not lbs:
            return ref.new_zeros(())
        return weight * torch.stack(lbs).sum()

    def _checkpointing(self) -> bool:
        return self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)``, recomputed in backward when gradient checkpointing is on.

        Note: adapter BatchNorm running statistics are updated again during the recomputation.
        """
        if self._checkpointing():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _run_stage(
        self, s: int, fv: Tensor, fa: Tensor, hw_v: Grid, hw_a: Grid, weights: list[Tensor], lbs: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """All blocks of stage ``s`` in lockstep order. fv (M, Nv, Cv), fa (M, Na, Ca)."""
        vblocks, ablocks = self._vstages[s].blocks, self._astages[s].blocks
        ratio = len(vblocks) // len(ablocks)
        positions: Optional[nn.ModuleList] = self.adapters[str(s)] if str(s) in self.adapters else None
        for j, vblk in enumerate(vblocks):
            k, paired = divmod(j, ratio)
            if paired != ratio - 1:  # unpaired visual block: runs whole
                fv = self._call(self._visual_block, vblk, fv, hw_v)
            elif positions is None:  # paired, no adapters: v and a are independent, order is immaterial
                fv = self._call(self._visual_block, vblk, fv, hw_v)
                fa = self._call(self._audio_block, ablocks[k], fa, hw_a)
            else:
                fv, fa, w, lb = self._call(self._paired_block, positions[k], vblk, ablocks[k], fv, fa, hw_v, hw_a)
                weights.extend(w)
                lbs.append(lb)
        return fv, fa

    # Block dispatch: the library path (``fast`` off) or the fused one; both compute the same function.
    def _attn_half(self, vblk: nn.Module, fv: Tensor, hw: Grid) -> Tensor:
        if not self.config.fast:
            return swin.attn_half(vblk, fv, hw)
        return swin.attn_half_fast(vblk, fv, hw, self._frozen_cache, self._compiled["swin.window_core"],
                                   gemm.choose(self.onednn_gemm))

    def _mlp_half(self, vblk: nn.Module, fv: Tensor) -> Tensor:
        if not self.config.fast:
            return swin.mlp_half(vblk, fv)
        return self._compiled["swin.mlp_half"](vblk, fv, gemm.choose(self.onednn_gemm))

    def _visual_block(self, vblk: nn.Module, fv: Tensor, hw: Grid) -> Tensor:
        if not self.config.fast:
            return swin.block(vblk, fv, hw)
        return self._mlp_half(vblk, self._attn_half(vblk, fv, hw))

    def _audio_block(self, ablk: nn.Module, fa: Tensor, hw: Grid) -> Tensor:
        if not self.config.fast:
            return htsat.block(ablk, fa, hw)
        return htsat.block_fast(ablk, fa, hw, self._frozen_cache, self._compiled["htsat.window_core"],
                                gemm.choose(self.onednn_gemm))

    def _moe(self, module: MoEAdapter, x: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.config.fast and self.batch_experts:
            return self._compiled["moe_adapter.batched"](module, x, other, self.factor_token_map, self.onednn_gemm)
        return self._compiled["moe_adapter"](module, x, other)

    def _paired_block(
        self, pos: PairedAdapters, vblk: nn.Module, ablk: nn.Module, fv: Tensor, fa: Tensor, hw_v: Grid, hw_a: Grid
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
        """One paired block with its four MoE modules; router weights returned in the order a1, v1, a2, v2."""
        ra1, wa1, la1 = self._moe(pos.a1, fa, fv)  # (M, Na, Ca)
        rv1, wv1, lv1 = self._moe(pos.v1, fv, fa)  # (M, Nv, Cv)
        fv = self._attn_half(vblk, fv, hw_v) + rv1
        fa = self._audio_block(ablk, fa, hw_a) + ra1
        ra2, wa2, la2 = self._moe(pos.a2, fa, fv)
        rv2, wv2, lv2 = self._moe(pos.v2, fv, fa)
        fv = self._mlp_half(vblk, fv) + rv2
        fa = fa + ra2
        return fv, fa, (wa1, wv1, wa2, wv2), la1 + lv1 + la2 + lv2


def _moe_call(module: MoEAdapter, x: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One MoE adapter call (the unit regional compilation compiles; shared by every adapter module)."""
    return module(x, other)
