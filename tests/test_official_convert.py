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
F64 = torch.float64


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
        expert = re.match(r"^experts\.(\d+)\.", rest)
        if expert is not None:  # experts 0..num_cross-1 cross-modal, then the unimodal ones (official order)
            j, num_cross = int(expert[1]), cfg.adapter.num_cross_experts
            kind = f"multimodal_experts.{j}." if j < num_cross else f"singlemodal_experts.{j - num_cross}."
            rest = kind + rest[expert.end():]
        rest = rest.replace("fusion.tokens", "my_tokens").replace("fusion.gate", "gate_av")
        rest = rest.replace("self_attention.tokens", "my_tokens").replace("self_attention.gate", "gate_self")
        rest = rest.replace(".mha.", ".self_attention.")  # AVS-S4 unimodal expert: MultiheadAttention over frames
        rest = rest.replace("bottleneck.bn_down.", "bn1.").replace("bottleneck.bn_up.", "bn2.")
        rest = rest.replace("bottleneck.ln_", "ln_")
        if rest.endswith(("bottleneck.down.weight", "bottleneck.up.weight")):
            g, o, i = v.shape
            rest, v = rest.replace("bottleneck.down", "down_sampler").replace("bottleneck.up", "up_sampler"), \
                v.reshape(g * o, i, 1, 1)
        official[f"{side}_{prefix}_p{m[4]}.{index[(int(m[1]), int(m[2]))]}.{rest}"] = v
    return official


def _ave_case(task):
    from avmoe.tasks.ave import AVETask

    head_cfg = AVEHeadConfig(visual_dim=32, audio_dim=8, d_model=16, num_heads=2, ff_dim=32, num_layers=2)
    official_head = lambda dims: OfficialAVEHead(dims["visual"], dims["audio"], 32, 8, 16, 32, 2)  # noqa: E731

    def compare(target, official_head, dims):
        feats_v = torch.randn(1, 10, dims["visual"], dtype=F64)
        feats_a = torch.randn(1, 10, dims["audio"], dtype=F64)
        ref = official_head(feats_v, feats_a)
        out = target.head(feats_v, feats_a)
        return zip((out["is_event"], out["event_scores"], out["av_score"]), ref)

    return (lambda cfg: AVETask(backbone=cfg, head=head_cfg)), official_head, "moe_adapter_blocks", compare, {}


def _avvp_case(task):
    from avmoe.models.heads.avvp import AVVPHeadConfig
    from avmoe.tasks.avvp import AVVPTask
    from tests.official_avvp import OfficialMGNHead

    head_cfg = AVVPHeadConfig(dim=16, num_heads=4, depth_audio=1, depth_visual=1, depth_av=2, st_dim=6)
    official_head = lambda dims: OfficialMGNHead(dims["visual"], dims["audio"], 6, 16, 4, (1, 1, 2))  # noqa: E731

    def compare(target, official_head, dims):
        feats_v = torch.randn(1, 10, dims["visual"], dtype=F64)
        feats_a, st = torch.randn(1, 10, dims["audio"], dtype=F64), torch.randn(1, 10, 6, dtype=F64)
        ref = official_head(feats_a, feats_v, st)
        out = target.head(feats_v, feats_a, st)
        return zip((out["global_prob"], out["audio_seg_prob"]), (ref[2], ref[5].transpose(1, 2)))

    return (lambda cfg: AVVPTask(backbone=cfg, head=head_cfg)), official_head, "adapter_blocks", compare, {}


def _avs_case(task):
    """Pred_endecoder (AVMOE/AVS/avs_scripts/avs_{s4,ms3}/model/PVT_AVSModel_v2.py): the S4 / MS3 gamma."""
    from avmoe.models.heads.avs import AVSHeadConfig
    from avmoe.tasks.avs import AVSTask
    from tests.official_avs import OfficialAVSHead

    gamma, frames, mask = (0.05 if task == "avs_s4" else 0.1), 5, 32
    head_cfg = AVSHeadConfig(channels=8, mask_size=mask, audio_dim=4, gamma=gamma, temporal_d_model=8,
                             temporal_heads=2, temporal_ff_dim=12)

    def official_head(dims):
        grids = [g[0] for g in dims["visual_grids"]]
        sizes = [mask // 4 // 2 ** i for i in range(4)]  # 56/28/14/7 at 224
        return OfficialAVSHead(dims["visual_stages"], dims["audio"], 8, 4, 8, 12, 2, frames, grids, sizes, gamma)

    def compare(target, official_head, dims):
        grids = [tuple(g) for g in dims["visual_grids"]]
        stages = [torch.randn(1, frames, h * w, c, dtype=F64) for (h, w), c in zip(grids, dims["visual_stages"])]
        audio = torch.randn(1, frames, dims["audio"], dtype=F64)
        pred, maps, a_fea = official_head([x.flatten(0, 1) for x in stages], audio)
        out = target.head(stages, grids, audio)
        got = [out["logits"]] + [out[f"stage_map_{s}"] for s in range(4)] + [out[f"stage_audio_{s}"] for s in range(4)]
        return zip(got, [pred.view(1, frames, mask, mask), *maps, *a_fea])

    # built by Pred_endecoder, never used by its forward: the PVT-v2 encoder of AVSBench, the deepest rcu1
    extra = {"encoder_backbone.patch_embed1.proj.weight": torch.zeros(4, 3, 7, 7),
             "conv4.conv1.weight": torch.zeros(4, 4, 3, 3)}
    return (lambda cfg: AVSTask(backbone=cfg, head=head_cfg)), official_head, "moe_adapter_blocks", compare, extra


def _avqa_case(task):
    """AVQA_Fusion_Net (AVMOE/AVQA/net_grd_avst/net_avst_v2.py): adapters ``{audio,vis}_adapter_blocks_p*``."""
    from avmoe.models.heads.avqa import AVQAHeadConfig
    from avmoe.tasks.avqa import AVQATask
    from tests.official_avqa import OfficialAVQAHead

    answers, words, b, t, length = ["yes", "no", "two"], [f"w{i}" for i in range(9)], 2, 3, 5

    def build(cfg):
        return AVQATask(backbone=cfg, head=AVQAHeadConfig(num_heads=4), answer_vocab=answers, question_vocab=words)

    def official_head(dims):
        grid = dims["visual_grids"][-1][0]
        return OfficialAVQAHead(dims["visual"], dims["audio"], len(words), len(answers), 4, grid)

    def compare(target, official_head, dims):
        n, d = official_head.grid ** 2, dims["visual"]
        pos, neg = torch.randn(b * t, n, d, dtype=F64), torch.randn(b * t, n, d, dtype=F64)
        audio, question = torch.randn(b * t, dims["audio"], dtype=F64), torch.randint(0, len(words), (b, length))
        out_qa, match_pos, match_neg = official_head(pos, neg, audio, question, b, t)
        out = target.head(pos.view(b, t, n, d), audio.view(b, t, -1), question, neg.view(b, t, n, d))
        return zip((out["answer_logits"], out["match_pos"].flatten(0, 1), out["match_neg"].flatten(0, 1)),
                   (out_qa, match_pos, match_neg))

    return build, official_head, "adapter_blocks", compare, {}


CASES = {"ave": _ave_case, "avvp": _avvp_case, "avs_s4": _avs_case, "avs_ms3": _avs_case, "avqa": _avqa_case}


def _backbone_config(task: str):
    if task == "ave":
        return tiny_config()
    from avmoe.models.presets import paper_adapter

    adapter = paper_adapter(task)  # the official adapters of the task (unimodal expert variant, BN, skip, experts)
    adapter.num_latents, adapter.router_hidden = 4, [16, 8]
    adapter.reduction = min(adapter.reduction, 4)
    return tiny_config(adapter=adapter)


@pytest.mark.parametrize("task", list(CASES))
def test_official_checkpoint_through_init_from(tmp_path, task):
    cfg = _backbone_config(task)
    torch.manual_seed(0)
    build, make_official_head, prefix, compare, extra = CASES[task](task)
    source = build(cfg)
    dims = source.backbone.feature_dims
    official_head = make_official_head(dims)
    _randomise(source.backbone.adapters)
    _randomise(official_head)
    official = _official_backbone(source, prefix) | official_head.state_dict() | extra
    official["swin.head.weight"] = torch.zeros(3, dims["visual"])  # timm classifier: no counterpart
    official["htsat.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(2, 1, 4)
    src, dst = tmp_path / "official.pt", tmp_path / "converted.pt"
    torch.save({f"module.{k}": v for k, v in official.items()}, src)  # DataParallel-saved, as the official may be
    lines: list[str] = []
    conversion = main(["--task", task, str(src), str(dst), "--audio-depths", *map(str, cfg.audio.depths),
                       "--num-skip", str(cfg.adapter.num_skip), "--num-multimodal-experts",
                       str(cfg.adapter.num_cross_experts), "--num-conv-group", str(cfg.adapter.conv_groups)],
                      log=lines.append)
    reported = {"swin.head.weight", "htsat.spectrogram_extractor.stft.conv_real.weight", *extra}
    assert reported <= set(conversion.unmatched)
    unused = r"(encoder_layer|decoder_layer|self_attn|head\.|spectrogram|encoder_backbone|conv4|path4\.resConfUnit1" \
             r"|_pure|norm3)"
    assert all(re.search(unused, k) for k in conversion.unmatched), conversion.unmatched
    assert "without counterpart" in lines[0] and lines[-1] == f"wrote {dst}"

    torch.manual_seed(1)
    target = build(cfg)
    init_weights(target, str(dst), strict=True)  # every avmoe tensor comes from the official checkpoint
    want = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, want[key]), key
    target.double().eval()  # float64: equal within rounding, not within float32 noise through the decoders
    official_head.double().eval()
    with torch.no_grad():
        pairs = list(compare(target, official_head, dims))
    for got, want_out in pairs:
        torch.testing.assert_close(got, want_out, rtol=1e-10, atol=1e-10)


def test_load_official_refuses_non_tensor_pickles(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "opt": object.__new__(nn.Identity)}, bad)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_official(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_official(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not covered"):
        convert_official({}, "vggsound")


# ---- the recipes' starting checkpoints -----------------------------------------------------------------------------
def test_dgsct_ave_checkpoint_loads_what_the_official_takes(tmp_path):
    """DG-SCT's AVE checkpoint (``models/best_82.18.pt``, ``model.state_dict()`` of DG-SCT's MMIL_Net saved by
    haoyi-duan/DG-SCT ``DG-SCT/AVE/main_trans.py`` 298): ``swin``, ``htsat``, ``temporal_attn``, ``CMBS`` as in
    AVMoE's MMIL_Net, its own adapters ``{audio,vis}_adapter_blocks_p*`` (``VisualAdapter``) and
    ``adapter_token_downsampler``. AVMOE/AVE/main_trans_v3.py 254 loads it with ``strict=False``: the same-named
    encoders and head load, the DG-SCT adapters have no same-named key and are skipped (AVMoE's adapters start fresh).
    """
    cfg = tiny_config()
    torch.manual_seed(0)
    build, make_official_head, _, compare, _ = _ave_case("ave")
    source = build(cfg)
    dims = source.backbone.feature_dims
    official_head = make_official_head(dims)
    _randomise(official_head)
    dgsct = {k: v for k, v in _official_backbone(source).items() if k.startswith(("swin.", "htsat."))}
    dgsct |= official_head.state_dict()
    dgsct_adapters = {"audio_adapter_blocks_p1.0.my_tokens": torch.randn(32, 32),  # VisualAdapter tensors
                      "vis_adapter_blocks_p2.3.down_sampler.weight": torch.randn(4, 32, 1, 1),
                      "adapter_token_downsampler.0.weight": torch.randn(4, 4),
                      # DG-SCT's CMBS LayerNorms (net_trans.py 264-265): AVMoE's CMBS has none (net_trans_v3.py)
                      "CMBS.video_norm.weight": torch.randn(16), "CMBS.audio_norm.bias": torch.randn(16)}
    src, dst = tmp_path / "best_82.18.pt", tmp_path / "converted.pt"
    torch.save(dgsct | dgsct_adapters, src)
    conversion = main(["--task", "ave", "--source", "dgsct", str(src), str(dst), "--audio-depths",
                       *map(str, cfg.audio.depths)], log=lambda _: None)
    assert set(dgsct_adapters) <= set(conversion.unmatched)
    assert conversion.unmatched["CMBS.video_norm.weight"] == "no counterpart"
    assert not any(k.startswith("backbone.adapters.") for k in conversion.state_dict)

    torch.manual_seed(1)
    target = build(cfg)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("backbone.adapters.")}
    with pytest.raises(RuntimeError, match="missing keys"):
        init_weights(target, str(dst), strict=True)
    missing, unexpected = init_weights(target, str(dst), strict=False)  # --run.init_strict false
    assert set(missing) == set(fresh) and not unexpected  # exactly the adapters start fresh, as in the official
    want = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith(("backbone.visual_encoder.", "backbone.audio_encoder.")):
            assert torch.equal(value, want[key]), key
    target.double().eval()
    official_head.double().eval()
    with torch.no_grad():
        for got, ref in compare(target, official_head, dims):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_lavish_grounding_checkpoint_loads_what_the_official_takes(tmp_path):
    """The grounding checkpoint (``lavish_grounding_gen_best.pt``, ``nn.DataParallel(AVQA_AVatt_Grounding)``
    saved by AVMOE/AVQA/grounding_gen/main_grd_gen.py 257, 288): AVMOE/AVQA/net_grd_avst/main_avst_v2.py 337-351
    takes ``module.{fc_a1,fc_a2,fc_gl,fc1,fc2,fc3,fc4}.{weight,bias}`` only (and copies fc_a1 / fc_a2 into the
    never-used ``*_pure`` layers); its Swin, HTS-AT and adapters are not taken."""
    build, make_official_head, _, _, _ = _avqa_case("avqa")
    cfg = _backbone_config("avqa")
    torch.manual_seed(0)
    target = build(cfg)
    dims = target.backbone.feature_dims
    official_head = make_official_head(dims)
    _randomise(official_head)
    taken = {k: v for k, v in official_head.state_dict().items()
             if re.match(r"^(fc_a1|fc_a2|fc_gl|fc[1-4])\.", k)}
    assert len(taken) == 14
    others = {"swin.layers.0.blocks.0.attn.qkv.weight": torch.randn(96, 32), "htsat.bn0.weight": torch.randn(8),
              "audio_adapter_blocks_p1.0.gate": torch.randn(1), "fc_a1_pure.weight": torch.randn(4, 4)}
    src, dst = tmp_path / "lavish_grounding_gen_best.pt", tmp_path / "converted.pt"
    torch.save({f"module.{k}": v for k, v in (taken | others).items()}, src)
    conversion = main(["--task", "avqa", "--source", "lavish_grounding", str(src), str(dst)], log=lambda _: None)
    assert set(conversion.unmatched) == set(others)
    assert {k.rsplit(".", 1)[0] for k in conversion.state_dict} == {
        "head.audio_fc1", "head.audio_fc2", "head.grounding_fc", "head.match.0", "head.match.2", "head.match.4",
        "head.match.6"}
    missing, unexpected = init_weights(target, str(dst), strict=False)
    assert not unexpected and not any(k.startswith("head.audio_fc") or k.startswith("head.match.") for k in missing)
    # the grounding + match path reads only these layers: equal to the official one on the same features
    b, t, n, d = 2, 3, official_head.grid ** 2, dims["visual"]
    pos, neg = torch.randn(b * t, n, d, dtype=F64), torch.randn(b * t, n, d, dtype=F64)
    audio, question = torch.randn(b * t, dims["audio"], dtype=F64), torch.zeros(b, 4, dtype=torch.long)
    target.double().eval()
    official_head.double().eval()
    with torch.no_grad():
        _, match_pos, match_neg = official_head(pos, neg, audio, question, b, t)
        out = target.head(pos.view(b, t, n, d), audio.view(b, t, -1), question, neg.view(b, t, n, d))
    torch.testing.assert_close(out["match_pos"].flatten(0, 1), match_pos, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["match_neg"].flatten(0, 1), match_neg, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="does not serve"):
        convert_official({}, "ave", source="lavish_grounding")
