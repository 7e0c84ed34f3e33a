"""Convert a checkpoint of the official AVMoE code into avmoe's layout, for ``--run.init_from``.

The official code (yingchengy/AVMOE) saves ``model.state_dict()`` of its task model (``MMIL_Net`` in
``AVMOE/AVE/main_trans_v3.py`` and ``AVMOE/AVVP/main.py``, ``Pred_endecoder`` in ``AVMOE/AVS/avs_scripts/*/
train_v2.py``, ``AVQA_Fusion_Net`` in ``AVMOE/AVQA/net_grd_avst/main_avst_v2.py``): ``swin.*`` (timm 0.6.12
Swin-V2), ``htsat.*`` (the HTS-AT code), ``{audio,vis}_[moe_]adapter_blocks_{p1,p2}.<i>.*`` (the MoE adapters,
``i`` counting the adapter positions in order) and the head. This module renames and reshapes those tensors into
the keys of the matching avmoe task; the result loads with ``--run.init_from``::

    python -m avmoe.convert_official --task ave official_ave.pt ave_avmoe.pt
    lightning fit --config lightning_configs/ave.yaml --run.init_from ave_avmoe.pt
    python -m avmoe.convert_official --task avvp official_avvp.pt avvp_avmoe.pt      # lightning_configs/avvp.yaml
    python -m avmoe.convert_official --task avs_s4 official_s4.pt s4_avmoe.pt        # lightning_configs/avs_s4.yaml
    python -m avmoe.convert_official --task avs_ms3 official_ms3.pt ms3_avmoe.pt     # lightning_configs/avs_ms3.yaml
    python -m avmoe.convert_official --task avqa official_avqa.pt avqa_avmoe.pt      # lightning_configs/avqa.yaml

Tested end to end for every task (official-layout state dict -> CLI -> ``init_weights`` strict -> backbone tensors
identical, head outputs equal in float64 to the transcriptions of the official heads). The recipes' starting
checkpoints convert with ``--source``: ``dgsct`` (DG-SCT's AVE ``best_82.18.pt``: encoders and head, its own adapters
reported) and ``lavish_grounding`` (the AVQA grounding checkpoint: only the layers ``main_avst_v2.py`` takes); both
results are partial, for ``--run.init_strict false``.

Keys without a counterpart are reported, never silently dropped: the decoder layers' ``self_attn`` and the
``encoder_layer`` / ``decoder_layer`` templates (built by the official code, never called), the timm classifier
``head`` and buffers that avmoe recomputes (``relative_coords_table``, ``relative_position_index``, ``attn_mask``,
the HTS-AT STFT / log-mel front end).

Mapping (official -> avmoe):

- ``swin.`` -> ``backbone.visual_encoder.`` (timm -> ``transformers.Swinv2Model``): ``patch_embed.proj`` ->
  ``embeddings.patch_embeddings.projection``, ``patch_embed.norm`` -> ``embeddings.norm``, ``layers.*`` ->
  ``encoder.layers.*``; per block ``attn.qkv`` (rows q, k, v) -> ``attention.self.{query,key,value}``,
  ``attn.q_bias`` / ``attn.v_bias`` -> ``query.bias`` / ``value.bias`` (the key has no bias in both),
  ``attn.logit_scale`` and ``attn.cpb_mlp`` -> ``attention.self.{logit_scale,continuous_position_bias_mlp}``,
  ``attn.proj`` -> ``attention.output.dense``, ``norm1`` / ``norm2`` -> ``layernorm_before`` / ``layernorm_after``,
  ``mlp.fc1`` / ``mlp.fc2`` -> ``intermediate.dense`` / ``output.dense``; ``norm`` -> ``layernorm``.
- ``htsat.`` -> ``backbone.audio_encoder.`` via :func:`avmoe.models.backbones.convert_htsat.convert_htsat_state_dict`.
- ``audio_moe_adapter_blocks_p1.<i>`` -> ``backbone.adapters.<stage>.<block>.a1`` (``vis_`` -> ``v``, ``p2`` -> ``2``),
  position ``i`` -> (stage, block) from the HTS-AT depths and ``num_skip``; inside: ``conv_adapter`` (1x1 Conv2d)
  -> ``token_map.token_weight`` / ``token_bias``, ``fc`` -> ``token_map.fc``, ``router.{0,2,4}`` ->
  ``router.mlp.{0,2,4}``, ``multimodal_experts.<j>`` then ``singlemodal_experts.<j>`` -> ``experts.<k>`` in that
  order; per expert ``my_tokens`` / ``gate_av`` -> ``fusion.tokens`` / ``fusion.gate``, ``down_sampler`` /
  ``up_sampler`` (grouped 1x1 Conv2d) -> ``bottleneck.down`` / ``bottleneck.up`` (``(groups, out/g, in/g)``),
  ``bn1`` / ``bn2`` -> ``bottleneck.bn_down`` / ``bottleneck.bn_up``, ``ln_before`` / ``ln_post`` -> ``bottleneck.*``,
  ``gate`` -> ``gate``.
- AVE head -> ``head.``: ``temporal_attn.v_fc`` -> ``v_proj.0``, ``a_fc`` -> ``a_proj``,
  ``audio_visual_rnn_layer.{visual,audio}_rnn`` -> ``{v,a}_lstm``, ``{video,audio}_encoder.affine_matrix`` ->
  ``{v,a}_in``, ``{video,audio}_encoder.encoder.layers`` -> ``{v,a}_encoder.layers``,
  ``{video,audio}_decoder.affine_matrix`` -> ``{v,a}_query``, ``{video,audio}_decoder.decoder.layers.0`` ->
  ``{v,a}_decoder``, ``{video,audio}_gated.0`` -> ``{v,a}_gate``; ``CMBS.{video,audio}_cas`` -> ``{v,a}_cas``,
  ``CMBS.localize_module.classifier`` -> ``event_head``, ``CMBS.localize_module.event_classifier`` -> ``class_head``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from avmoe.models.backbones.convert_htsat import convert_htsat_state_dict

Rule = tuple["re.Pattern[str]", Any]
# Official defaults per task: HTS-AT tiny depths and the adapter skip rule (``num_skip`` of the task's train script;
# AVVP's forward has no skip rule: adapters at every block).
OFFICIAL_LAYOUT = {  # num_cross / conv_groups: num_multimodal_experts / num_conv_group of the official run
    "ave": {"audio_depths": (2, 2, 6, 2), "num_skip": 2, "num_cross": 1, "conv_groups": 2, "head": "ave"},
    "avvp": {"audio_depths": (2, 2, 6, 2), "num_skip": 1, "num_cross": 1, "conv_groups": 2, "head": "avvp"},
    "avs_s4": {"audio_depths": (2, 2, 6, 2), "num_skip": 1, "num_cross": 1, "conv_groups": 2, "head": "avs"},
    "avs_ms3": {"audio_depths": (2, 2, 6, 2), "num_skip": 2, "num_cross": 2, "conv_groups": 2, "head": "avs"},
    "avqa": {"audio_depths": (2, 2, 6, 2), "num_skip": 1, "num_cross": 1, "conv_groups": 4, "head": "avqa"},
}
TASKS = tuple(OFFICIAL_LAYOUT)
# Where the checkpoint comes from: a run of the official AVMoE code, or a recipe's starting checkpoint (task it serves).
SOURCES = {"avmoe": TASKS, "dgsct": ("ave",), "lavish_grounding": ("avqa",)}
# DG-SCT's MMIL_Net (haoyi-duan/DG-SCT DG-SCT/AVE/nets/net_trans.py) adapters: no same-named key in AVMoE's MMIL_Net
# (its adapters are *_moe_adapter_blocks_*), so AVMOE/AVE/main_trans_v3.py's load_state_dict(strict=False) skips them.
_DGSCT_ADAPTERS = re.compile(r"^((audio|vis)_adapter_blocks_p[12]|adapter_token_downsampler)\.")
# The only grounding-checkpoint keys AVMOE/AVQA/net_grd_avst/main_avst_v2.py takes (its ``tmp`` list, 343).
_LAVISH_TAKEN = re.compile(r"^(fc_a1|fc_a2|fc_gl|fc[1-4])\.(weight|bias)$")


@dataclass
class Conversion:
    """Converted tensors plus what had no counterpart (official key -> why)."""

    state_dict: dict[str, Tensor] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"converted {len(self.state_dict)} tensors; {len(self.unmatched)} official keys without counterpart"]
        lines += [f"  {key}: {why}" for key, why in sorted(self.unmatched.items())]
        return "\n".join(lines)


def _rules(pairs: Sequence[tuple[str, str]]) -> list[Rule]:
    return [(re.compile(p), r) for p, r in pairs]


# Official keys that the official forward never reads (templates, unused self-attention, recomputed buffers).
_UNUSED = re.compile(
    r"(\.encoder_layer\.|\.decoder_layer\.|\.decoder\.layers\.\d+\.self_attn\.|^swin\.head\."
    r"|^swin\..*\.(relative_coords_table|relative_position_index|attn_mask)$)")
# HTS-AT keys that convert_htsat_state_dict drops on purpose.
_HTSAT_DROPPED = re.compile(r"^(spectrogram_extractor\.|logmel_extractor\.|tscam_conv\.|head\.)|\.attn_mask$")

_AVE_HEAD = _rules([
    (r"^temporal_attn\.v_fc\.", "head.v_proj.0."),
    (r"^temporal_attn\.a_fc\.", "head.a_proj."),
    (r"^temporal_attn\.audio_visual_rnn_layer\.visual_rnn\.", "head.v_lstm."),
    (r"^temporal_attn\.audio_visual_rnn_layer\.audio_rnn\.", "head.a_lstm."),
    (r"^temporal_attn\.video_encoder\.affine_matrix\.", "head.v_in."),
    (r"^temporal_attn\.audio_encoder\.affine_matrix\.", "head.a_in."),
    (r"^temporal_attn\.video_encoder\.encoder\.layers\.", "head.v_encoder.layers."),
    (r"^temporal_attn\.audio_encoder\.encoder\.layers\.", "head.a_encoder.layers."),
    (r"^temporal_attn\.video_decoder\.affine_matrix\.", "head.v_query."),
    (r"^temporal_attn\.audio_decoder\.affine_matrix\.", "head.a_query."),
    (r"^temporal_attn\.video_decoder\.decoder\.layers\.0\.", "head.v_decoder."),
    (r"^temporal_attn\.audio_decoder\.decoder\.layers\.0\.", "head.a_decoder."),
    (r"^temporal_attn\.video_gated\.0\.", "head.v_gate."),
    (r"^temporal_attn\.audio_gated\.0\.", "head.a_gate."),
    (r"^CMBS\.video_cas\.", "head.v_cas."),
    (r"^CMBS\.audio_cas\.", "head.a_cas."),
    (r"^CMBS\.localize_module\.classifier\.", "head.event_head."),
    (r"^CMBS\.localize_module\.event_classifier\.", "head.class_head."),
])

def _stage(offset: str) -> Callable[["re.Match[str]"], str]:
    """Replacement naming a 1-based official index (``x1_linear_``, ``tpavi_b1``, ``path1``) 0-based."""
    return lambda m: offset.format(int(m[1]) - 1)


_AVS_HEAD: list[tuple["re.Pattern[str]", object]] = [(re.compile(p), r) for p, r in [
    (r"^x([1-4])_linear_\.", _stage("head.taps.{}.")),
    (r"^audio_linear\.", "head.audio_proj."),
    (r"^temporal_attn\.v_fc\.(\d)\.", r"head.temporal.stages.\1.v_fc."),
    (r"^temporal_attn\.audio_visual_rnn_layer\.(\d)\.visual_rnn\.", r"head.temporal.stages.\1.v_lstm."),
    (r"^temporal_attn\.audio_visual_rnn_layer\.(\d)\.audio_rnn\.", r"head.temporal.stages.\1.a_lstm."),
    (r"^temporal_attn\.video_encoder\.(\d)\.affine_matrix\.", r"head.temporal.stages.\1.v_encoder.0."),
    (r"^temporal_attn\.audio_encoder\.(\d)\.affine_matrix\.", r"head.temporal.stages.\1.a_encoder.0."),
    (r"^temporal_attn\.video_encoder\.(\d)\.encoder\.layers\.", r"head.temporal.stages.\1.v_encoder.1.layers."),
    (r"^temporal_attn\.audio_encoder\.(\d)\.encoder\.layers\.", r"head.temporal.stages.\1.a_encoder.1.layers."),
    (r"^temporal_attn\.audio_gated\.(\d)\.0\.", r"head.temporal.stages.\1.audio_gate."),
    (r"^temporal_attn\.video_gated\.(\d)\.0\.", r"head.temporal.stages.\1.video_gate."),
    (r"^tpavi_b([1-4])\.", _stage("head.tpavi.{}.")),
    (r"\.W_z\.0\.", ".w_z."),
    (r"\.W_z\.1\.", ".bn."),
    (r"\.norm_layer\.", ".norm."),
    (r"^path([1-4])\.resConfUnit1\.", _stage("head.paths.{}.rcu1.")),
    (r"^path([1-4])\.resConfUnit2\.", _stage("head.paths.{}.rcu2.")),
    (r"^output_conv\.", "head.output_conv."),
]]
# Built by the official Pred_endecoder and never used by its forward (PVT-v2 encoder and classifiers of the
# AVSBench original, the temporal cross-modal decoders, the skip unit of the deepest fusion block).
_AVS_UNUSED = re.compile(r"^(encoder_backbone\.|conv[1-4]\.|x[1-4]_linear\.|temporal_attn\.(video|audio)_decoder\."
                         r"|path4\.resConfUnit1\.)")


def _avs_tensor(key: str, value: Tensor) -> Tensor:
    """TPAVI 1x1x1 Conv3d -> per-frame 1x1 Conv2d; phi sees the audio broadcast over space -> a Linear."""
    if re.search(r"^head\.tpavi\.\d\.phi\.weight$", key):
        return value[:, :, 0, 0, 0].clone()
    if re.search(r"^head\.tpavi\.\d\.(g|theta|w_z)\.weight$", key):
        return value[:, :, 0].clone()
    return value


_AVQA_HEAD = _rules([
    (r"^fc_a1\.", "head.audio_fc1."),
    (r"^fc_a2\.", "head.audio_fc2."),
    (r"^fc_gl\.", "head.grounding_fc."),
    (r"^fc1\.", "head.match.0."),
    (r"^fc2\.", "head.match.2."),
    (r"^fc3\.", "head.match.4."),
    (r"^fc4\.", "head.match.6."),
    (r"^question_encoder\.word2vec\.", "head.question_encoder.embed."),
    (r"^question_encoder\.lstm\.", "head.question_encoder.lstm."),
    (r"^question_encoder\.fc\.", "head.question_encoder.fc."),
    (r"^attn_v\.", "head.visual_attn.attn."),
    (r"^linear11\.", "head.visual_attn.ff1."),
    (r"^linear12\.", "head.visual_attn.ff2."),
    (r"^norm1\.", "head.visual_attn.norm."),
    (r"^attn_a\.", "head.audio_attn.attn."),
    (r"^linear21\.", "head.audio_attn.ff1."),
    (r"^linear22\.", "head.audio_attn.ff2."),
    (r"^norm2\.", "head.audio_attn.norm."),
    (r"^fc_fusion\.", "head.fusion."),
    (r"^fc_ans\.", "head.classifier."),
])
_AVQA_UNUSED = re.compile(r"^(fc_a1_pure\.|fc_a2_pure\.|norm3\.)")  # AVQA_Fusion_Net builds them, never calls them


_AVVP_HEAD = _rules([
    (r"^(audio|visual)_token$", r"head.\1_token.weight"),
    (r"^(fc_a|fc_v|fc_st|fc_fusion|fc_prob|fc_prob_a|fc_prob_v|fc_cls|audio_cug|visual_cug|av_mcg)\.", r"head.\1."),
    (r"\.han_encoder\.", ".han."),
    (r"\.(mlp|mlp_inter|mlp_channels)\.fc1\.", r".\1.0."),
    (r"\.(mlp|mlp_inter|mlp_channels)\.fc2\.", r".\1.2."),
    (r"\.([qkv])_proj\.", r".\1."),
])


HEADS = {"ave": (_AVE_HEAD, True, None, lambda k, v: v), "avs": (_AVS_HEAD, False, _AVS_UNUSED, _avs_tensor),
         "avqa": (_AVQA_HEAD, True, _AVQA_UNUSED, lambda k, v: v),
         "avvp": (_AVVP_HEAD, False, None, lambda k, v: v)}
_FUSED_QKV = re.compile(r"^(?P<base>.+\.attn\.)qkv\.(?P<kind>weight|bias)$")  # MGN AttnBlock: rows q, k, v


def convert_head(sd: dict[str, Tensor], task: str, out: Optional[Conversion] = None) -> Conversion:
    """Head keys of an official ``task`` state dict -> ``head.*`` (other keys are reported as unmatched)."""
    rules, first_only, unused, tensor = HEADS[task]
    out = out if out is not None else Conversion()
    for key, value in sd.items():
        if _UNUSED.search(key) or (unused is not None and unused.search(key)):
            out.unmatched[key] = "not used by the official forward"
        elif (new := _apply(rules, key, first_only)) is not None:
            if (fused := _FUSED_QKV.match(new)) is not None:
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out.state_dict[f"{fused['base']}{name}.{fused['kind']}"] = part.clone()
            else:
                out.state_dict[new] = tensor(new, value)
        else:
            out.unmatched[key] = "no counterpart"
    return out


_SWIN = _rules([
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "embeddings.norm."),
    (r"^norm\.", "layernorm."),
    (r"^layers\.", "encoder.layers."),
    (r"\.attn\.logit_scale$", ".attention.self.logit_scale"),
    (r"\.attn\.cpb_mlp\.", ".attention.self.continuous_position_bias_mlp."),
    (r"\.attn\.proj\.", ".attention.output.dense."),
    (r"\.attn\.q_bias$", ".attention.self.query.bias"),
    (r"\.attn\.v_bias$", ".attention.self.value.bias"),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
])

# AVE / AVS: ``{audio,vis}_moe_adapter_blocks_p*``; AVVP / AVQA: ``{audio,vis}_adapter_blocks_p*``.
_ADAPTER = re.compile(r"^(?P<side>audio|vis)_(moe_)?adapter_blocks_p(?P<phase>[12])\.(?P<i>\d+)\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^(?P<kind>multimodal|singlemodal)_experts\.(?P<j>\d+)\.(?P<rest>.+)$")
_SHARED_EXPERT = [
    (r"^gate$", "gate"),
    (r"^down_sampler\.weight$", "bottleneck.down.weight"),
    (r"^up_sampler\.weight$", "bottleneck.up.weight"),
    (r"^bn1\.", "bottleneck.bn_down."),
    (r"^bn2\.", "bottleneck.bn_up."),
    (r"^ln_before\.", "bottleneck.ln_before."),
    (r"^ln_post\.", "bottleneck.ln_post."),
]
_EXPERT_RULES = {
    # cross-modal expert: latent tokens attending to the other modality
    "multimodal": _rules([(r"^my_tokens$", "fusion.tokens"), (r"^gate_av$", "fusion.gate"), *_SHARED_EXPERT]),
    # unimodal expert variants: AVVP's parameter-free self-attention (gate_av), AVS-S4's MultiheadAttention over
    # frames (self_attention, ``self_attention_version v1``), AVS-MS3's latent tokens (``v2``: my_tokens, gate_self)
    "singlemodal": _rules([(r"^gate_av$", "gate_av"), (r"^self_attention\.", "mha."),
                           (r"^my_tokens$", "self_attention.tokens"), (r"^gate_self$", "self_attention.gate"),
                           *_SHARED_EXPERT]),
}


def _apply(rules: list[Rule], key: str, first_only: bool) -> Optional[str]:
    out, hit = key, False
    for pattern, repl in rules:
        out, count = pattern.subn(repl, out)
        if count:
            hit = True
            if first_only:
                break
    return out if hit else None


def adapter_positions(audio_depths: Sequence[int], num_skip: int) -> list[tuple[int, int]]:
    """(stage, block) of each official adapter index: audio blocks of the stages that carry adapters, in order."""
    return [(s, k) for s, depth in enumerate(audio_depths) if not (num_skip > 1 and (s + 1) % num_skip == 0)
            for k in range(depth)]


def _grouped(conv_weight: Tensor, groups: int) -> Tensor:
    """Grouped 1x1 Conv2d weight (out, in/g, 1, 1) -> GroupedLinear weight (g, out/g, in/g)."""
    out, in_g = conv_weight.shape[:2]
    return conv_weight.reshape(groups, out // groups, in_g).clone()


def _convert_adapter(rest: str, value: Tensor, num_cross: int, groups: int) -> tuple[Optional[str], Tensor]:
    if rest.startswith("conv_adapter."):
        kind = rest.split(".", 1)[1]
        return ("token_map.token_weight", value[:, :, 0, 0].clone()) if kind == "weight" else \
            ("token_map.token_bias", value)
    if rest.startswith("fc."):
        return "token_map." + rest, value
    if rest.startswith("router."):
        return "router.mlp." + rest[len("router."):], value
    expert = _EXPERT.match(rest)
    if expert is None:
        return None, value
    k = int(expert["j"]) + (0 if expert["kind"] == "multimodal" else num_cross)
    inner = _apply(_EXPERT_RULES[expert["kind"]], expert["rest"], first_only=True)
    if inner is None:
        return None, value
    if inner in ("bottleneck.down.weight", "bottleneck.up.weight"):
        value = _grouped(value, groups)
    return f"experts.{k}.{inner}", value


def _convert_swin(sd: dict[str, Tensor], out: Conversion, prefix: str) -> None:
    for key, value in sd.items():
        qkv = re.match(r"^(?P<block>.+)\.attn\.qkv\.weight$", key)
        if qkv is not None:
            base = prefix + _apply(_SWIN, qkv["block"] + ".x", first_only=False)[:-2] + ".attention.self."
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out.state_dict[f"{base}{name}.weight"] = part.clone()
            continue
        new = _apply(_SWIN, key, first_only=False)
        if new is None:
            out.unmatched["swin." + key] = "no counterpart"
        else:
            out.state_dict[prefix + new] = value


def convert_official(sd: dict[str, Tensor], task: str = "ave", audio_depths: Optional[Sequence[int]] = None,
                     num_skip: Optional[int] = None, num_cross_experts: Optional[int] = None,
                     conv_groups: Optional[int] = None, source: str = "avmoe") -> Conversion:
    """Map the state dict of an official ``task`` model (``MMIL_Net``, ``Pred_endecoder``, ...) to avmoe task keys.

    ``source``: ``avmoe`` (a checkpoint of the official AVMoE code), ``dgsct`` (DG-SCT's released AVE checkpoint,
    the AVE recipe's start: its encoders and head, without its adapters) or ``lavish_grounding`` (the LAVisH
    grounding checkpoint, the AVQA recipe's start: only the audio projection, grounding and match layers). The
    result of the last two is partial: load it with ``--run.init_strict false``.

    ``audio_depths`` / ``num_skip`` place the official adapter indices (defaults: the task's official values);
    ``num_cross_experts`` is ``num_multimodal_experts`` and ``conv_groups`` is ``num_conv_group`` of the official run
    (defaults: the task's official values, ``OFFICIAL_LAYOUT``).
    """
    if task not in TASKS:
        raise ValueError(f"convert_official: task {task!r} is not covered (covered: {', '.join(TASKS)})")
    if source not in SOURCES or task not in SOURCES[source]:
        raise ValueError(f"convert_official: source {source!r} does not serve task {task!r} "
                         f"({', '.join(f'{k}: {v}' for k, v in SOURCES.items())})")
    layout = OFFICIAL_LAYOUT[task]
    positions = adapter_positions(audio_depths or layout["audio_depths"], num_skip or layout["num_skip"])
    num_cross_experts = num_cross_experts if num_cross_experts is not None else layout["num_cross"]
    conv_groups = conv_groups if conv_groups is not None else layout["conv_groups"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}  # DataParallel prefix
    out = Conversion()
    if source == "dgsct":
        for key in [k for k in sd if _DGSCT_ADAPTERS.match(k)]:
            out.unmatched[key] = "DG-SCT adapter: no AVMoE counterpart (main_trans_v3.py's strict=False load skips it)"
            del sd[key]
    elif source == "lavish_grounding":
        for key in [k for k in sd if not _LAVISH_TAKEN.match(k)]:
            out.unmatched[key] = "not taken from the grounding checkpoint by main_avst_v2.py"
            del sd[key]
    swin, htsat, head = {}, {}, {}
    for key, value in sd.items():
        if _UNUSED.search(key):
            out.unmatched[key] = "not used by the official forward (or a buffer avmoe recomputes)"
        elif key.startswith("swin."):
            swin[key[len("swin."):]] = value
        elif key.startswith("htsat."):
            htsat[key[len("htsat."):]] = value
        elif (adapter := _ADAPTER.match(key)) is not None:
            i = int(adapter["i"])
            if i >= len(positions):
                out.unmatched[key] = f"adapter index {i} beyond the {len(positions)} positions of the layout"
                continue
            name, tensor = _convert_adapter(adapter["rest"], value, num_cross_experts, conv_groups)
            if name is None:
                out.unmatched[key] = "no counterpart"
                continue
            s, k = positions[i]
            module = ("a" if adapter["side"] == "audio" else "v") + adapter["phase"]
            out.state_dict[f"backbone.adapters.{s}.{k}.{module}.{name}"] = tensor
        else:
            head[key] = value
    convert_head(head, layout["head"], out)
    _convert_swin(swin, out, "backbone.visual_encoder.")
    audio = convert_htsat_state_dict(htsat)
    for key in sorted(k for k in htsat if _HTSAT_DROPPED.search(k)):
        out.unmatched["htsat." + key] = "HTS-AT front end / classifier / recomputed mask, unused by avmoe"
    out.state_dict.update({"backbone.audio_encoder." + k: v for k, v in audio.items()})
    return out


def load_official(path: str | os.PathLike) -> dict[str, Tensor]:
    """An official checkpoint as a flat state dict, loaded with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # unpickling refused: say which file and why, do not fall back to full pickle
        raise RuntimeError(f"{path}: not loadable with torch.load(weights_only=True) ({err}); re-save it as a plain "
                           "state dict of tensors") from err
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise RuntimeError(f"{path}: expected a state dict (name -> tensor), got {type(ckpt).__name__}")
    return sd


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], object] = print) -> Conversion:
    parser = argparse.ArgumentParser(prog="python -m avmoe.convert_official", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("src", help="checkpoint saved by the official code (model.state_dict())")
    parser.add_argument("dst", help="output state dict for --run.init_from")
    parser.add_argument("--audio-depths", type=int, nargs="+", default=None, help="HTS-AT depths (official: 2 2 6 2)")
    parser.add_argument("--num-skip", type=int, default=None, help="official num_skip (AVE: 2)")
    parser.add_argument("--num-multimodal-experts", type=int, default=None, help="official value of the task")
    parser.add_argument("--num-conv-group", type=int, default=None, help="official value of the task")
    parser.add_argument("--source", choices=tuple(SOURCES), default="avmoe",
                        help="avmoe: trained with the official AVMoE code; dgsct: DG-SCT's AVE checkpoint (task ave); "
                             "lavish_grounding: the LAVisH grounding checkpoint (task avqa); the last two are "
                             "partial: load with --run.init_strict false")
    args = parser.parse_args(argv)
    conversion = convert_official(load_official(args.src), args.task, args.audio_depths, args.num_skip,
                                  args.num_multimodal_experts, args.num_conv_group, args.source)
    torch.save(conversion.state_dict, args.dst)
    log(conversion.summary())
    log(f"wrote {args.dst}")
    return conversion


if __name__ == "__main__":
    main(sys.argv[1:])
