"""Task heads against transcriptions of the official AVMoE forward (yingchengy/AVMOE), float64, tiny sizes.

The official weights are those of the transcription (official attribute names, random values), moved into avmoe's
layout by :func:`avmoe.convert_official.convert_official`, so each test checks the head and the key map together.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from avmoe.convert_official import convert_official
from avmoe.metrics.ave import BACKGROUND
from avmoe.models.heads.ave import AVEHead, AVEHeadConfig
from tests.official_ave import OfficialAVEHead, official_ave_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# Official relations kept at tiny size: video_dim = 2 * d_model, audio RNN hidden = d_model / 2 = audio_dim.
B, T, VIS_IN, AUD_IN, VIDEO_DIM, AUDIO_DIM, D, FF, HEADS = 3, 10, 20, 12, 16, 4, 8, 24, 2
TINY = AVEHeadConfig(visual_dim=VIDEO_DIM, audio_dim=AUDIO_DIM, d_model=D, num_heads=HEADS, ff_dim=FF)


def _perturb(module: nn.Module) -> None:
    """Every tensor random (LayerNorm scales and biases too), so a swapped or missed key shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))


@pytest.fixture(scope="module")
def official_and_ours() -> tuple[OfficialAVEHead, AVEHead, dict[str, str]]:
    torch.manual_seed(0)
    official = OfficialAVEHead(VIS_IN, AUD_IN, VIDEO_DIM, AUDIO_DIM, D, FF, HEADS).double()
    _perturb(official)
    conversion = convert_official(official.state_dict(), "ave")
    ours = AVEHead(VIS_IN, AUD_IN, TINY).double()
    head = {k[len("head."):]: v for k, v in conversion.state_dict.items()}
    assert set(head) == set(ours.state_dict()), "every head tensor comes from the official checkpoint"
    ours.load_state_dict(head, strict=True)
    return official.eval(), ours.eval(), conversion.unmatched


def test_ave_head_equals_official_cmbs(official_and_ours):
    official, ours, unmatched = official_and_ours
    torch.manual_seed(1)
    f_v, f_a = torch.randn(B, T, VIS_IN, dtype=torch.float64), torch.randn(B, T, AUD_IN, dtype=torch.float64)
    with torch.no_grad():
        ref = official(f_v, f_a)
        out = ours(f_v, f_a)
    for name, want in zip(("is_event", "event_scores", "av_score"), ref):
        assert out[name].shape == want.shape
        diff = (out[name] - want).abs().max().item()
        assert diff <= 1e-12 * max(1.0, want.abs().max().item()), f"{name}: max |diff| {diff:.3g}"
    # What has no counterpart is exactly what the official forward never calls.
    assert unmatched and all(".encoder_layer." in k or ".decoder_layer." in k or ".self_attn." in k for k in unmatched)
    assert {k for k in unmatched if ".decoder.layers.0.self_attn." in k}, "the never-called decoder self-attention"


def test_transformer_decoder_option_differs_and_keeps_old_layout():
    cfg = AVEHeadConfig(**{**TINY.__dict__, "decoder": "transformer"})
    old = AVEHead(VIS_IN, AUD_IN, cfg)
    assert "v_decoder.layers.0.self_attn.in_proj_weight" in old.state_dict() and not hasattr(old, "v_query")
    out = old(torch.randn(B, T, VIS_IN), torch.randn(B, T, AUD_IN))
    assert out["is_event"].shape == (B, T)
    with pytest.raises(ValueError, match="decoder"):
        AVEHead(VIS_IN, AUD_IN, AVEHeadConfig(decoder="bogus"))  # type: ignore[arg-type]


def _labels(b: int, events: list[tuple[int, int, int] | None]) -> torch.Tensor:
    label = torch.full((b, T), BACKGROUND)
    for row, ev in enumerate(events):
        if ev is not None:
            cls, start, stop = ev
            label[row, start:stop] = cls
    return label


def _one_hot(label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(label, 29).to(torch.float64)  # (B, T, 29), background last


@pytest.fixture(scope="module")
def ave_task_cls():
    from avmoe.tasks.ave import AVETask

    return AVETask


@pytest.mark.parametrize("background_clips", ["official", "exclude"])
def test_ave_losses_equal_official(official_and_ours, ave_task_cls, background_clips):
    official, ours, _ = official_and_ours
    task = ave_task_cls.__new__(ave_task_cls)  # the loss needs no model: skip building a backbone
    task.background_clips = background_clips
    torch.manual_seed(2)
    f_v, f_a = torch.randn(B, T, VIS_IN, dtype=torch.float64), torch.randn(B, T, AUD_IN, dtype=torch.float64)
    # "official" mode includes a clip without any event (official video class 0); "exclude" mode only differs there.
    events = [(3, 2, 6), (0, 0, 10), None] if background_clips == "official" else [(3, 2, 6), (0, 0, 10), (27, 5, 9)]
    label = _labels(B, events)
    with torch.no_grad():
        ref = official_ave_loss(*official(f_v, f_a), _one_hot(label))
        losses = ave_task_cls.compute_losses(task, ours(f_v, f_a), {"label": label})
    assert set(losses) == {"loss_event", "loss_class", "loss_av"}
    total = sum(losses.values())
    assert total.dtype == torch.float64, "the BCE target follows the logits' dtype"
    assert abs(total.item() - ref.item()) <= 1e-12 * abs(ref.item()), (total.item(), ref.item())


def test_ave_losses_same_terms_without_events(ave_task_cls):
    """A batch without any event still yields the three terms, with (zero) gradients to the class heads."""
    task = ave_task_cls.__new__(ave_task_cls)
    task.background_clips = "exclude"
    scores = torch.randn(2, 28, requires_grad=True)
    out = {"is_event": torch.randn(2, T, requires_grad=True), "event_scores": scores, "av_score": scores * 2}
    losses = ave_task_cls.compute_losses(task, out, {"label": _labels(2, [None, None])})
    assert set(losses) == {"loss_event", "loss_class", "loss_av"}
    assert losses["loss_class"].item() == 0 and losses["loss_av"].item() == 0
    sum(losses.values()).backward()
    assert scores.grad is not None and torch.count_nonzero(scores.grad) == 0


def test_ave_batch_size_1_without_events_under_plain_ddp(tmp_path, ave_task_cls):
    """Plain DDP (find_unused_parameters=False) raises when a parameter got no gradient in the previous step.

    Two steps on one background-only clip, then one with an event: each step must reduce every parameter.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from avmoe.models.presets import tiny_config
    from tests.test_ave_task import TINY_HEAD, tiny_batch

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    torch.manual_seed(0)
    task = ave_task_cls(backbone=tiny_config(), head=TINY_HEAD)
    task.train()
    ddp = DistributedDataParallel(task, find_unused_parameters=False)
    batch = tiny_batch(task, b=1)
    batch["label"][:] = BACKGROUND
    trainable = [p for p in task.parameters() if p.requires_grad]
    for step in range(3):
        if step == 2:
            batch["label"][0, 3:5] = 4
        _, out = ddp(batch)
        losses = task.compute_losses(out, batch)
        assert set(losses) == {"loss_event", "loss_class", "loss_av"}
        ddp.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert all(p.grad is not None for p in trainable), "a parameter without gradient breaks plain DDP"


# ---- HTS-AT in train mode as the official (AVMOE/AVE/nets/htsat.py, net_trans_v3.py forward_swin) -----------------
def test_htsat_train_mode_drop_path_on_both_branches_and_no_mlp_dropout():
    from transformers.models.clap.modeling_clap import ClapDropPath

    from avmoe.models.backbones import htsat
    from avmoe.models.presets import tiny_config

    model = htsat.build_htsat(tiny_config(audio={"drop_path_rate": 0.3}).audio)
    layers = [layer for stage in model.audio_encoder.layers for layer in stage.blocks]
    rates = [layer.drop_path.drop_prob if isinstance(layer.drop_path, ClapDropPath) else 0.0 for layer in layers]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3), "linear decay 0 -> drop_path_rate as the official"
    for layer, rate in zip(layers, rates):
        mlp_branch = layer.output.dropout
        assert (mlp_branch.drop_prob if isinstance(mlp_branch, ClapDropPath) else 0.0) == rate
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout)), "official drop_rate is 0"
    assert isinstance(model.spec_augment, htsat.SpecAugment) and not htsat.build_htsat(
        tiny_config(audio={"spec_augment": False}).audio).__dict__["_modules"].get("spec_augment")
    # Drop-path on the MLP branch: in train mode, with both branches (almost surely) dropped, a block is the identity.
    for layer in layers:
        layer.drop_path, layer.output.dropout = ClapDropPath(1 - 1e-12), ClapDropPath(1 - 1e-12)
    model.train()
    x = torch.randn(2, 16, layers[0].layernorm_before.normalized_shape[0])
    assert torch.equal(htsat.block(layers[0], x, (4, 4)), x)


def test_htsat_spec_augment_only_in_train_mode():
    from avmoe.models.backbones.htsat import SpecAugment

    aug = SpecAugment()
    x = torch.ones(64, 1, 101, 64)
    assert torch.equal(aug.eval()(x), x)
    torch.manual_seed(0)
    y = aug.train()(x)
    time_zero = (y == 0).all(dim=3).squeeze(1)  # (M, frames): whole time stripes zeroed
    freq_zero = (y == 0).all(dim=2).squeeze(1)  # (M, mels)
    assert time_zero.any() and freq_zero.any()
    assert time_zero.sum(1).max() <= 2 * 63 and freq_zero.sum(1).max() <= 2 * 7
    assert ((y == 0) == (time_zero[:, None, :, None] | freq_zero[:, None, None, :])).all(), "zeros only in stripes"
    assert len({tuple(row.tolist()) for row in time_zero}) > 1, "stripes drawn per sample"


# ---- AVS: temporal gating, TPAVI, decoder (AVMOE/AVS/avs_scripts/avs_{s4,ms3}/model/PVT_AVSModel_v2.py) ------------
@pytest.mark.parametrize("gamma", [0.05, 0.1], ids=["s4", "ms3"])
def test_avs_head_equals_official(gamma):
    from avmoe.convert_official import convert_head
    from avmoe.models.heads.avs import AVSHead, AVSHeadConfig
    from tests.official_avs import OfficialAVSHead

    b, t, c, a_dim, d, ff, heads, mask = 2, 5, 8, 4, 8, 12, 2, 32
    dims, grids, audio_in = [6, 10, 12, 14], [6, 3, 2, 1], 12
    torch.manual_seed(0)
    official = OfficialAVSHead(dims, audio_in, c, a_dim, d, ff, heads, t, grids, [8, 4, 2, 1], gamma).double()
    _perturb_all(official)
    conversion = convert_head(official.state_dict(), "avs")
    cfg = AVSHeadConfig(channels=c, mask_size=mask, audio_dim=a_dim, gamma=gamma, temporal_d_model=d,
                        temporal_heads=heads, temporal_ff_dim=ff)
    ours = AVSHead(dims, audio_in, cfg).double()
    head = {k[len("head."):]: v for k, v in conversion.state_dict.items()}
    ours.load_state_dict(head, strict=True)
    assert set(head) == set(ours.state_dict())
    unused = r"(encoder_layer|path4\.resConfUnit1)"
    assert conversion.unmatched and all(re.search(unused, k) for k in conversion.unmatched), conversion.unmatched
    official.eval()
    ours.eval()
    stages = [torch.randn(b, t, g * g, dim, dtype=torch.float64) for g, dim in zip(grids, dims)]
    audio = torch.randn(b, t, audio_in, dtype=torch.float64)
    with torch.no_grad():
        pred, maps, a_fea = official([x.flatten(0, 1) for x in stages], audio)
        out = ours(stages, [(g, g) for g in grids], audio)
    _assert_close64(out["logits"], pred.view(b, t, mask, mask), "logits")
    for s in range(4):
        _assert_close64(out[f"stage_map_{s}"], maps[s], f"stage_map_{s}")
        _assert_close64(out[f"stage_audio_{s}"], a_fea[s], f"stage_audio_{s}")


# ---- AVS losses (AVMOE/AVS/avs_scripts/avs_s4/loss.py, avs_ms3/loss.py with the train_v2.sh flags) ---------------
@pytest.mark.parametrize("setting, pooling, normalize", [("s4", "avg", False), ("ms3", "avg", False),
                                                         ("ms3", "max", True)],
                         ids=["s4", "ms3-script", "ms3-max-norm"])
def test_avs_losses_equal_official(setting, pooling, normalize):
    from avmoe.tasks.avs import AVSLossConfig, AVSTask
    from tests.official_avs import F1_IoU_BCELoss, IouSemanticAwareLoss_ms3

    b, t, size, c = 3, 5, 16, 6
    torch.manual_seed(0)
    logits = torch.randn(b, t, size, size, dtype=torch.float64) * 2
    mask = (torch.rand(b, t, 1, size, size) > 0.6).to(torch.float64)
    maps = [torch.randn(b * t, c, s, s, dtype=torch.float64) for s in (8, 4, 2, 1)]  # TPAVI outputs per stage
    audio = [torch.randn(b, t, c, dtype=torch.float64) for _ in range(4)]
    outputs = {"logits": logits, **{f"stage_map_{s}": maps[s] for s in range(4)},
               **{f"stage_audio_{s}": audio[s] for s in range(4)}}
    task = AVSTask.__new__(AVSTask)
    if setting == "s4":  # train_v2.sh: no --sa_loss_flag; train clips annotated on frame 1 only
        valid = torch.zeros(b, t, dtype=torch.bool)
        valid[:, 0] = True
        task.loss_config = AVSLossConfig()
        ref = F1_IoU_BCELoss(logits.flatten(0, 1).unsqueeze(1), mask[:, :1, :1])  # gt [bs, 1, 1, H, W]
    else:  # --masked_av_flag --masked_av_stages 0 1 2 3 --lambda_1 0.5 --kl_flag (norm_fea_flag off)
        valid = torch.ones(b, t, dtype=torch.bool)
        task.loss_config = AVSLossConfig(masked_av_weight=0.5, mask_pooling=pooling, normalize_features=normalize)
        ref = IouSemanticAwareLoss_ms3(logits.flatten(0, 1).unsqueeze(1), mask.flatten(0, 1), audio, maps,
                                       sa_loss_flag=True, count_stages=[0, 1, 2, 3], lambda_1=0.5,
                                       mask_pooling_type=pooling, norm_fea=normalize, kl_flag=True)
    losses = AVSTask.compute_losses(task, outputs, {"mask": mask, "mask_valid": valid})
    assert set(losses) == ({"loss_bce"} if setting == "s4" else {"loss_bce", "loss_masked_av"})
    total = sum(losses.values())
    assert total.dtype == torch.float64, total.dtype
    assert abs(total.item() - ref.item()) <= 1e-13 * ref.item(), (total.item(), ref.item())


def _perturb_all(module: nn.Module) -> None:
    """Random parameters and BatchNorm statistics (TPAVI's BN starts at zero: it would hide the whole block)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)


def _assert_close64(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-11 * max(1.0, want.abs().max().item()), f"{name}: max |diff| {diff:.3g}"


# ---- AVQA: grounding, match MLP, question attention, fusion (AVMOE/AVQA/net_grd_avst/net_avst_v2.py) ----------
def test_avqa_head_equals_official():
    from avmoe.convert_official import convert_head
    from avmoe.models.heads.avqa import AVQAHead, AVQAHeadConfig
    from tests.official_avqa import OfficialAVQAHead

    b, t, d, audio_in, vocab, answers, heads, grid, length = 3, 4, 16, 12, 11, 7, 4, 3, 6
    torch.manual_seed(0)
    official = OfficialAVQAHead(d, audio_in, vocab, answers, heads, grid).double()
    _perturb_all(official)
    conversion = convert_head(official.state_dict(), "avqa")
    ours = AVQAHead(d, audio_in, vocab, answers, AVQAHeadConfig(num_heads=heads)).double()
    head = {k[len("head."):]: v for k, v in conversion.state_dict.items()}
    assert set(head) == set(ours.state_dict())
    ours.load_state_dict(head, strict=True)
    assert set(conversion.unmatched) == {k for k in official.state_dict() if k.startswith(("fc_a1_pure", "fc_a2_pure",
                                                                                            "norm3"))}
    official.eval()
    ours.eval()
    pos, neg = (torch.randn(b * t, grid * grid, d, dtype=torch.float64) for _ in range(2))
    audio = torch.randn(b * t, audio_in, dtype=torch.float64)
    question = torch.randint(0, vocab, (b, length))
    with torch.no_grad():
        out_qa, match_pos, match_neg = official(pos, neg, audio, question, b, t)
        out = ours(pos.view(b, t, grid * grid, d), audio.view(b, t, audio_in), question, neg.view(b, t, -1, d))
    _assert_close64(out["answer_logits"], out_qa, "answer_logits")
    _assert_close64(out["match_pos"].flatten(0, 1), match_pos, "match_pos")
    _assert_close64(out["match_neg"].flatten(0, 1), match_neg, "match_neg")

    # Loss: main_avst_v2.py:102-107, batch_organize 72-86 (rows interleaved positive, negative).
    from avmoe.tasks.avqa import AVQATask

    answer = torch.randint(0, answers, (b,))
    match = torch.stack([match_pos, match_neg], 1).reshape(2 * b * t, 2)
    labels = torch.tensor([1, 0] * (b * t))
    ref = nn.CrossEntropyLoss()(out_qa, answer) + 0.5 * nn.CrossEntropyLoss()(match, labels)
    task = AVQATask.__new__(AVQATask)
    task.match_weight = 0.5
    with torch.no_grad():
        losses = AVQATask.compute_losses(task, out, {"answer": answer})
    total = sum(losses.values())
    assert set(losses) == {"loss_qa", "loss_match"}
    assert total.dtype == torch.float64 and abs(total.item() - ref.item()) <= 1e-12 * ref.item(), (total, ref)


# ---- AVVP: MGN (AVMOE/AVVP/nets/mgn.py, nets/grouping.py) ---------------------------------------------------------
@pytest.mark.parametrize("assign", ["soft", "hard"])
def test_avvp_mgn_head_equals_official(assign):
    from avmoe.convert_official import convert_head
    from avmoe.models.heads.avvp import AVVPHeadConfig, MGNHead
    from tests.official_avvp import OfficialMGNHead

    t, dim, heads, v_in, a_in, st, classes = 10, 16, 4, 20, 12, 6, 25
    torch.manual_seed(0)
    official = OfficialMGNHead(v_in, a_in, st, dim, heads, (2, 2, 3), classes, t, assign, assign).double()
    _perturb_all(official)
    conversion = convert_head(official.state_dict(), "avvp")
    cfg = AVVPHeadConfig(dim=dim, num_heads=heads, depth_audio=2, depth_visual=2, depth_av=3, st_dim=st,
                         unimodal_assign=assign, crossmodal_assign=assign)
    ours = MGNHead(v_in, a_in, cfg).double()
    head = {k[len("head."):]: v for k, v in conversion.state_dict.items()}
    assert set(head) == set(ours.state_dict()) and not conversion.unmatched
    ours.load_state_dict(head, strict=True)
    official.eval()
    ours.eval()
    b = 2  # the official forward takes one clip at a time (batch size 1): run it per clip
    visual, audio = torch.randn(b, t, v_in, dtype=torch.float64), torch.randn(b, t, a_in, dtype=torch.float64)
    visual_st = torch.randn(b, t, st, dtype=torch.float64)
    with torch.no_grad():
        out = ours(visual, audio, visual_st)
        for i in range(b):
            ref = official(audio[i:i + 1], visual[i:i + 1], visual_st[i:i + 1])
            aud_cls, vis_cls, global_prob, a_prob, v_prob, a_frame, v_frame = ref
            _assert_close64(out["global_prob"][i:i + 1], global_prob, "global_prob")
            _assert_close64(out["audio_prob"][i:i + 1], a_prob, "audio_prob")
            _assert_close64(out["visual_prob"][i:i + 1], v_prob, "visual_prob")
            _assert_close64(out["audio_seg_prob"][i:i + 1], a_frame.transpose(1, 2), "audio_seg_prob")
            _assert_close64(out["visual_seg_prob"][i:i + 1], v_frame.transpose(1, 2), "visual_seg_prob")
            _assert_close64(out["audio_cls_logits"], aud_cls, "audio_cls_logits")
            _assert_close64(out["visual_cls_logits"], vis_cls, "visual_cls_logits")
