"""Official AVMoE checkpoints -> avmoe: the converter on official-layout state dicts, through ``--run.init_from``.

Official layouts, written from yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` (``MMIL_Net`` attribute names:
``swin`` = timm 0.6.12 ``swin_transformer_v2``, ``htsat`` = ``HTSAT_Swin_Transformer``, ``MoEAdapter`` /
``ExpertAdapter`` 296-487, the head) and built here from independent transcriptions (``tests/official_ave.py``) or,
for the frozen encoders, by renaming a tiny avmoe model's tensors into the timm / HTS-AT names.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from avmoe.cli import init_weights
from avmoe.convert_official import adapter_positions, convert_official, load_official, main
from avmoe.models.config import AdapterConfig
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.moe import MoEAdapter
from avmoe.models.presets import tiny_config
from tests.official_ave import MoEAdapter as OfficialMoEAdapter
from tests.official_ave import OfficialAVEHead

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)


def test_adapter_positions_follow_the_official_index():
    # HTS-AT tiny (2, 2, 6, 2) with num_skip=2: stages 1 and 3 carry no adapters; 8 positions (AVMOE/AVE/train.sh).
    assert adapter_positions((2, 2, 6, 2), 2) == [(0, 0), (0, 1)] + [(2, k) for k in range(6)]
    assert len(adapter_positions((2, 2, 6, 2), 1)) == 12


# (official unimodal expert, avmoe AdapterConfig.uni_expert, official attribute prefix, use_bn, training)
ADAPTER_CASES = [
    ("linear", "linear", "audio_moe_adapter_blocks_p2", True, False),  # AVE (train.sh)
    ("linear", "linear", "audio_moe_adapter_blocks_p2", True, True),  # BatchNorm batch statistics
    ("param_free", "param_free", "audio_adapter_blocks_p2", False, True),  # AVVP (is_bn 0)
    ("mha", "mha_frames", "vis_moe_adapter_blocks_p2", True, False),  # AVS-S4 (self_attention_version v1)
    ("latent", "latent", "vis_moe_adapter_blocks_p2", True, True),  # AVS-MS3 (v2)
    ("linear", "linear", "vis_adapter_blocks_p2", True, False),  # AVQA
]


@pytest.mark.parametrize("uni, variant, prefix, use_bn, training", ADAPTER_CASES,
                         ids=[f"{c[0]}-{c[2].split('_')[0]}-{'train' if c[4] else 'eval'}" for c in ADAPTER_CASES])
def test_moe_adapter_converted_equals_official(uni, variant, prefix, use_bn, training):
    torch.manual_seed(0)
    M, CA, NA, CV, NV = 4, 16, 6, 24, 9  # frames, this side's width/tokens, the other side's width/tokens
    official = OfficialMoEAdapter(CA, reduction_factor=4, num_conv_group=2, use_bn=use_bn, use_gate=True, num_tk=5,
                                  conv_dim_in=NV, conv_dim_out=NA, linear_in=CV, linear_out=CA, uni=uni).double()
    _randomise(official)
    sd = {f"{prefix}.3.{k}": v for k, v in official.state_dict().items()}
    conversion = convert_official(sd, "ave")
    s, k = adapter_positions((2, 2, 6, 2), 2)[3]
    module = ("a" if prefix.startswith("audio") else "v") + "2"
    target = f"backbone.adapters.{s}.{k}.{module}."
    assert all(key.startswith(target) for key in conversion.state_dict) and not conversion.unmatched
    cfg = AdapterConfig(num_latents=5, reduction=4, conv_groups=2, use_bn=use_bn, uni_expert=variant,
                        mha_heads=4, mha_dropout=0.0 if training else 0.2)
    ours = MoEAdapter(CA, CV, NA, NV, cfg, gated=True).double()
    ours.load_state_dict({key[len(target):]: v for key, v in conversion.state_dict.items()}, strict=True)
    if training and uni == "mha":
        official.singlemodal_experts[0].self_attention.dropout = 0.0
    official.train(training)
    ours.train(training)
    x, other = torch.randn(M, NA, CA, dtype=torch.float64), torch.randn(M, NV, CV, dtype=torch.float64) * 0.2
    with torch.no_grad():
        ref, ref_w = official(x.permute(0, 2, 1).unsqueeze(-1), other.permute(0, 2, 1).unsqueeze(-1))
        out, w, _ = ours(x, other)
    torch.testing.assert_close(w, ref_w.squeeze(1), rtol=0, atol=1e-13)
    torch.testing.assert_close(out, ref.squeeze(-1).permute(0, 2, 1), rtol=0, atol=1e-12)


# ---- frozen encoders: avmoe tensors renamed into the official (timm / HTS-AT) names --------------------------
_TO_TIMM = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^layernorm\.", "norm."),
    (r"^encoder\.layers\.", "layers."),
    (r"\.attention\.self\.logit_scale$", ".attn.logit_scale"),
    (r"\.attention\.self\.continuous_position_bias_mlp\.", ".attn.cpb_mlp."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.self\.query\.bias$", ".attn.q_bias"),
    (r"\.attention\.self\.value\.bias$", ".attn.v_bias"),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]
_TO_HTSAT = [
    (r"^batch_norm\.", "bn0."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.self\.relative_position_", ".attn.relative_position_"),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _qkv(sd: dict[str, Tensor], kinds: tuple[str, ...]) -> dict[str, Tensor]:
    """Fuse attention.self.{query,key,value}.<kind> into one attn.qkv.<kind> (rows q, k, v), as timm / HTS-AT hold."""
    out = dict(sd)
    for key in [k for k in sd if re.search(r"\.attention\.self\.query\.weight$", k)]:
        base = key[: -len("attention.self.query.weight")]
        for kind in kinds:
            parts = [out.pop(f"{base}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            out[f"{base}attn.qkv.{kind}"] = torch.cat(parts)
    return out


def _official_backbone(task, prefix: str = "moe_adapter_blocks") -> dict[str, Tensor]:
    sd = task.state_dict()
    vis = {k[len("backbone.visual_encoder."):]: v for k, v in sd.items() if k.startswith("backbone.visual_encoder.")}
    vis = _qkv(vis, ("weight",))  # Swin-V2 qkv has no bias; q_bias / v_bias are separate parameters
    official = {"swin." + _rename(k, _TO_TIMM): v for k, v in vis.items()}
    aud = {k[len("backbone.audio_encoder.audio_encoder."):]: v for k, v in sd.items()
           if k.startswith("backbone.audio_encoder.audio_encoder.")}
    official |= {"htsat." + _rename(k, _TO_HTSAT): v for k, v in _qkv(aud, ("weight", "bias")).items()}
    cfg = task.backbone_config
    index = {pos: i for i, pos in enumerate(adapter_positions(cfg.audio.depths, cfg.adapter.num_skip))}
    for key, v in sd.items():
        m = re.match(r"^backbone\.adapters\.(\d+)\.(\d+)\.([av])([12])\.(.+)$", key)
        if m is None:
            continue
        side = "audio" if m[3] == "a" else "vis"
        rest = m[5]
        if rest == "token_map.token_weight":
            rest, v = "conv_adapter.weight", v[:, :, None, None]
        rest = rest.replace("token_map.token_bias", "conv_adapter.bias")
        rest = rest.replace("token_map.fc.", "fc.").replace("router.mlp.", "router.")
        rest = re.sub(r"^experts\.0\.", "multimodal_experts.0.", rest)
        rest = re.sub(r"^experts\.1\.", "singlemodal_experts.0.", rest)
        rest = rest.replace("fusion.tokens", "my_tokens").replace("fusion.gate", "gate_av")
        rest = rest.replace("bottleneck.bn_down.", "bn1.").replace("bottleneck.bn_up.", "bn2.")
        rest = rest.replace("bottleneck.ln_", "ln_")
        if rest.endswith(("bottleneck.down.weight", "bottleneck.up.weight")):
            g, o, i = v.shape
            rest, v = rest.replace("bottleneck.down", "down_sampler").replace("bottleneck.up", "up_sampler"), \
                v.reshape(g * o, i, 1, 1)
        official[f"{side}_{prefix}_p{m[4]}.{index[(int(m[1]), int(m[2]))]}.{rest}"] = v
    return official


def _ave_case():
    from avmoe.models.heads.ave import AVEHeadConfig
    from avmoe.tasks.ave import AVETask

    head_cfg = AVEHeadConfig(visual_dim=32, audio_dim=8, d_model=16, num_heads=2, ff_dim=32, num_layers=2)
    official_head = lambda dims: OfficialAVEHead(dims["visual"], dims["audio"], 32, 8, 16, 32, 2)  # noqa: E731
    return (lambda cfg: AVETask(backbone=cfg, head=head_cfg)), official_head, "moe_adapter_blocks"


def _avvp_case():
    from avmoe.models.heads.avvp import AVVPHeadConfig
    from avmoe.tasks.avvp import AVVPTask
    from tests.official_avvp import OfficialMGNHead

    head_cfg = AVVPHeadConfig(dim=16, num_heads=4, depth_audio=1, depth_visual=1, depth_av=2, st_dim=6)
    official_head = lambda dims: OfficialMGNHead(dims["visual"], dims["audio"], 6, 16, 4, (1, 1, 2))  # noqa: E731
    return (lambda cfg: AVVPTask(backbone=cfg, head=head_cfg)), official_head, "adapter_blocks"


def _backbone_config(task: str):
    if task == "ave":
        return tiny_config()
    from avmoe.models.presets import paper_adapter

    adapter = paper_adapter("avvp")  # official AVVP adapters: parameter-free unimodal expert, no BN, every stage
    adapter.num_latents, adapter.reduction, adapter.router_hidden = 4, 4, [16, 8]
    return tiny_config(adapter=adapter)


@pytest.mark.parametrize("task", ["ave", "avvp"])
def test_official_checkpoint_through_init_from(tmp_path, task):
    cfg = _backbone_config(task)
    torch.manual_seed(0)
    build, make_official_head, prefix = (_ave_case if task == "ave" else _avvp_case)()
    source = build(cfg)
    dims = source.backbone.feature_dims
    official_head = make_official_head(dims)
    _randomise(source.backbone.adapters)
    _randomise(official_head)
    official = _official_backbone(source, prefix) | official_head.state_dict()
    official["swin.head.weight"] = torch.zeros(3, dims["visual"])  # timm classifier: no counterpart
    official["htsat.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(2, 1, 4)
    src, dst = tmp_path / "official.pt", tmp_path / "converted.pt"
    torch.save({f"module.{k}": v for k, v in official.items()}, src)  # DataParallel-saved, as the official may be
    lines: list[str] = []
    conversion = main(["--task", task, str(src), str(dst), "--audio-depths", *map(str, cfg.audio.depths),
                       "--num-skip", str(cfg.adapter.num_skip)], log=lines.append)
    assert {"swin.head.weight", "htsat.spectrogram_extractor.stft.conv_real.weight"} <= set(conversion.unmatched)
    unused = r"(encoder_layer|decoder_layer|self_attn|head\.|spectrogram)"
    assert all(re.search(unused, k) for k in conversion.unmatched), conversion.unmatched
    assert "without counterpart" in lines[0] and lines[-1] == f"wrote {dst}"

    torch.manual_seed(1)
    target = build(cfg)
    init_weights(target, str(dst), strict=True)  # every avmoe tensor comes from the official checkpoint
    want = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, want[key]), key
    feats_v, feats_a = torch.randn(1, 10, dims["visual"]), torch.randn(1, 10, dims["audio"])
    target.eval()
    official_head.eval()
    with torch.no_grad():
        if task == "ave":
            ref = official_head(feats_v, feats_a)
            out = target.head(feats_v, feats_a)
            pairs = zip((out["is_event"], out["event_scores"], out["av_score"]), ref)
        else:
            st = torch.randn(1, 10, 6)
            ref = official_head(feats_a, feats_v, st)
            out = target.head(feats_v, feats_a, st)
            pairs = zip((out["global_prob"], out["audio_seg_prob"]), (ref[2], ref[5].transpose(1, 2)))
    for got, want_out in pairs:
        torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-5)


def test_load_official_refuses_non_tensor_pickles(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "opt": object.__new__(nn.Identity)}, bad)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_official(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_official(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not covered"):
        convert_official({}, "vggsound")
