"""AVS model, losses, visual-only switch, configs, mask pictures, and short S4 / MS3 fits through the real CLI."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from unittest import mock

import lightning
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from avmoe.callbacks.avs_visual import GT_COLOUR, draw_masks
from avmoe.cli import cli_main
from avmoe.datamodules import AVSBenchDataModule, LogMel, LogMelConfig
from avmoe.metrics import AVSMetric
from avmoe.models.heads.avs import TPAVI, AVSHeadConfig
from avmoe.models.presets import paper_adapter, tiny_config
from avmoe.tasks.avs import UNUSED_DECODER_PREFIX, AVSLossConfig, AVSTask, masked_av_loss, silence_db
from tests.helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_HEAD = AVSHeadConfig(channels=16, mask_size=64, audio_dim=16, temporal_d_model=16, temporal_heads=2,
                          temporal_ff_dim=32, temporal_layers=1, output_hidden=[16, 8])


def run_cli(args: list[str]) -> None:
    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(args)


@pytest.fixture(scope="module")
def task() -> AVSTask:
    torch.manual_seed(0)
    adapter = replace(paper_adapter("avs_s4"), num_latents=4, reduction=4, router_hidden=[16, 8], mha_heads=2)
    return AVSTask(backbone=tiny_config(adapter=adapter), head=TINY_HEAD, loss=AVSLossConfig(masked_av_weight=0.5))


def _batch(task: AVSTask, b: int = 2, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mels = task.backbone_config.audio.num_mel_bins
    mask = (torch.rand(b, 5, 1, size, size, generator=g) < 0.2).float()
    valid = torch.zeros(b, 5, dtype=torch.bool)
    valid[:, 0] = True  # S4 train: first frame annotated
    return {"video": torch.randint(0, 256, (b, 5, 3, size, size), dtype=torch.uint8, generator=g),
            "audio": torch.randn(b, 5, 101, mels, generator=g) * 10 - 40, "mask": mask, "mask_valid": valid,
            "index": torch.arange(b)}


# ---- model --------------------------------------------------------------------------------------------------------
def _conv3d_1x1(conv2d: torch.nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 Conv3d on (B, C, T, H, W) with the weights of ``conv2d``."""
    return torch.einsum("oc,bcthw->bothw", conv2d.weight[:, :, 0, 0], z) + conv2d.bias.view(1, -1, 1, 1, 1)


def _tpavi_official(m: TPAVI, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """AVSBench TPAVIModule.forward (mode dot, 3-D) with its (THW)^2 matrix, using m's weights."""
    b, t = audio.shape[:2]
    c, h, w = x.shape[1:]
    x5 = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
    a = m.align_channel(audio).permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)  # (B, C, T, H, W)
    g_x = _conv3d_1x1(m.g, x5).reshape(b, m.inter, -1).permute(0, 2, 1)
    theta_x = _conv3d_1x1(m.theta, x5).reshape(b, m.inter, -1).permute(0, 2, 1)
    phi_x = (torch.einsum("oc,bcthw->bothw", m.phi.weight, a) + m.phi.bias.view(1, -1, 1, 1, 1)).reshape(b, m.inter, -1)
    f = torch.matmul(theta_x, phi_x)  # (B, THW, THW)
    y = torch.matmul(f / f.size(-1), g_x).permute(0, 2, 1).reshape(b, m.inter, t, h, w)
    w_y = _conv3d_1x1(m.w_z, y)
    w_y = F.batch_norm(w_y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps)
    z = m.norm((w_y + x5).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    return z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def test_tpavi_equals_the_official_dense_form():
    torch.manual_seed(0)
    m = TPAVI(channels=8, audio_dim=6).eval()
    torch.nn.init.normal_(m.bn.weight)  # the zero init would hide the attention path
    torch.nn.init.normal_(m.bn.bias)
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    x, audio = torch.randn(2 * 5, 8, 4, 3), torch.randn(2, 5, 6)
    z, aligned = m(x, audio)
    torch.testing.assert_close(z, _tpavi_official(m, x, audio), atol=1e-5, rtol=1e-5)
    assert aligned.shape == (2, 5, 8)


def test_head_outputs(task):
    task.eval()
    with torch.no_grad():
        _, out = task(_batch(task))
    assert out["logits"].shape == (2, 5, 64, 64)
    for s, size in enumerate((16, 8, 4, 2)):  # mask_size 64: taps at /4, /8, /16, /32
        assert out[f"stage_map_{s}"].shape == (10, 16, size, size)
        assert (out[f"stage_map_{s}"] >= 0).all()  # ReLU'd, as the official loss reads them
        assert out[f"stage_audio_{s}"].shape == (2, 5, 16)
    counts = task.parameter_counts()
    assert counts["frozen"] > 0 and counts["trainable"] > 0
    head_audio = {id(p) for m in task.head.modality_modules()["audio"] for p in m.parameters()}
    assert all(id(p) not in head_audio for p in task.head.taps.parameters())


@pytest.mark.parametrize("masked_av_weight", [0.0, 0.5])  # the S4 and MS3 losses
def test_every_trainable_parameter_gets_a_gradient(masked_av_weight):
    """Plain DDP (find_unused_parameters=False) needs every trainable parameter in every step's graph."""
    torch.manual_seed(0)
    model = AVSTask(backbone=tiny_config(), head=TINY_HEAD, loss=AVSLossConfig(masked_av_weight=masked_av_weight))
    model.train()
    batch = _batch(model)
    _, out = model(batch)
    torch.stack(list(model.compute_losses(out, batch).values())).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_checkpoints_with_the_unused_official_decoder_unit_still_load(task, tmp_path):
    state = task.state_dict()
    state.update({f"{UNUSED_DECODER_PREFIX}conv1.weight": torch.zeros(1),
                  f"{UNUSED_DECODER_PREFIX}conv1.bias": torch.zeros(1)})
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = AVSTask.load_from_checkpoint(path, weights_only=True)  # strict
    assert torch.equal(loaded.head.paths[0].rcu1.conv1.weight, task.head.paths[0].rcu1.conv1.weight)
    assert loaded.head.paths[3].rcu1 is None


# ---- losses -------------------------------------------------------------------------------------------------------
def _official_masked_av(pred_masks, a_fea_list, v_map_list):
    """AVSBench avs_ms3/loss.py A_MaskedV_SimmLoss(..., mask_pooling_type='avg', norm_fea=False, kl_flag=True)."""
    total = 0
    for a_fea, v_map in zip(a_fea_list, v_map_list):
        a_fea = a_fea.view(-1, a_fea.shape[-1])
        down = torch.sigmoid(torch.nn.AdaptiveAvgPool2d(v_map.shape[-2:])(pred_masks))
        masked_v_fea = torch.mul(v_map, down).mean(-1).mean(-1)
        total += F.kl_div(masked_v_fea.softmax(dim=-1).log(), a_fea.softmax(dim=-1), reduction="sum")
    return total / len(v_map_list)


def test_losses(task):
    task.eval()
    batch = _batch(task)
    with torch.no_grad():
        _, out = task(batch)
    losses = task.compute_losses(out, batch)
    first = F.binary_cross_entropy(torch.sigmoid(out["logits"][:, 0]), batch["mask"][:, 0, 0])  # official S4 form
    assert losses["loss_bce"].item() == pytest.approx(first.item(), rel=1e-5)
    other = {**batch, "mask": batch["mask"].clone()}
    other["mask"][:, 1:] = 1 - other["mask"][:, 1:]  # unannotated frames must not matter
    assert task.compute_losses(out, other)["loss_bce"].item() == pytest.approx(losses["loss_bce"].item())
    maps = [out[f"stage_map_{s}"] for s in range(4)]
    audio = [out[f"stage_audio_{s}"] for s in range(4)]
    expected = _official_masked_av(out["logits"].flatten(0, 1)[:, None], audio, maps)
    assert masked_av_loss(out["logits"], maps, audio).item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_masked_av"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no TPAVI block"):
        AVSTask(backbone=tiny_config(), head=replace(TINY_HEAD, tpavi_stages=[0, 1]),
                loss=AVSLossConfig(masked_av_weight=0.5))


def test_scores_metric_and_mask_size_check(task):
    task.eval()
    batch = _batch(task)
    target = batch["mask"][:, :, 0]
    perfect = {"logits": target * 20 - 10}
    assert torch.allclose(task.sample_correct(perfect, batch), torch.ones(2))
    assert torch.allclose(task.sample_correct({"logits": -perfect["logits"]}, batch), torch.zeros(2))
    scores = task.sample_scores(perfect, batch)
    assert ((scores > 0.99) & (scores <= 1)).all()
    assert (task.sample_scores({"logits": -perfect["logits"]}, batch) < 0.01).all()
    metric = task.make_metric()
    task.update_metric(metric, perfect, batch)
    assert metric.compute()["mj"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="head.mask_size"):
        task.compute_losses({"logits": torch.zeros(2, 5, 32, 32)}, batch)
    with torch.no_grad():
        pred = task.predict_step(batch, 0)
    assert pred["masks"].shape == (2, 5, 64, 64) and pred["masks"].dtype == torch.bool


def test_visual_only_eval_feeds_silence(task):
    mels = task.backbone_config.audio.num_mel_bins
    silence = LogMel(LogMelConfig(n_mels=mels))(np.zeros(5 * 32000, dtype=np.float32), 5)
    assert (silence == silence_db()).all(), "the log-mel of a zero waveform is the constant silence_db()"
    assert silence_db() == pytest.approx(-100.0, abs=1e-4)
    seen = []
    hook = task.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    batch = _batch(task)
    try:
        task.visual_only_eval = True
        assert task.eval_setting is not None and task.eval_setting.missing == "audio"  # the shared setting
        task.eval()
        with torch.no_grad():  # applied to evaluation batches (val / test / predict steps), not to forward()
            silent = task.validation_step(batch, 0)
        assert (seen[-1] == silence_db()).all()
        task.visual_only_eval = False
        with torch.no_grad():
            normal = task.validation_step(batch, 0)
        assert torch.equal(seen[-1], batch["audio"])
        assert not torch.allclose(silent["stage_audio_0"], normal["stage_audio_0"])  # the head saw silence
        task.visual_only_eval = True
        task.train()  # training is never affected
        task.training_step(batch, 0)
        assert torch.equal(seen[-1], batch["audio"])
    finally:
        hook.remove()
        task.visual_only_eval = False


# ---- pictures -----------------------------------------------------------------------------------------------------
def test_draw_masks():
    video = torch.full((5, 3, 32, 32), 128, dtype=torch.uint8)
    pred = torch.zeros(5, 16, 16, dtype=torch.bool)
    pred[:, :8] = True
    target = torch.zeros(5, 16, 16)
    target[:, 4:12, 4:12] = 1
    valid = torch.tensor([True, False, False, False, False])
    image = draw_masks(video, pred, target, valid)
    assert image.shape == (3, 16, 5 * 16) and image.dtype == torch.uint8
    assert image[0, 0, 0] > 128 > image[2, 0, 0]  # predicted foreground tinted orange
    assert image[:, 15, 15].tolist() == [128, 128, 128]
    assert image[:, 4, 6].tolist() == list(GT_COLOUR)  # outline of the annotated frame
    assert image[:, 4, 16 + 6].tolist() != list(GT_COLOUR)  # no outline on unannotated frames


# ---- configs ------------------------------------------------------------------------------------------------------
def _print_config(*configs: str, extra: tuple[str, ...] = ()) -> dict:
    out = io.StringIO()
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + list(extra) + ["--print_config"]
    with pytest.raises(SystemExit), redirect_stdout(out):
        run_cli(args)
    return yaml.safe_load(out.getvalue())


def test_paper_configs():
    s4 = _print_config(CONFIGS / "avs_s4.yaml")["model"]["init_args"]
    assert s4["backbone"]["audio"]["trainable"] is True  # the released S4 script's choice
    assert {"uni_expert": "mha_frames", "num_skip": 1, "router_noise_std": 0.01, "audio_gate": False,
            "use_bn": False}.items() <= s4["backbone"]["adapter"].items()
    assert s4["head"]["gamma"] == 0.05 and s4["optim"]["lr"] == 3e-4 and s4["loss"]["masked_av_weight"] == 0
    ms3_cfg = _print_config(CONFIGS / "avs_ms3.yaml")
    ms3 = ms3_cfg["model"]["init_args"]
    assert ms3["backbone"]["audio"]["trainable"] is False
    assert {"uni_expert": "latent", "num_cross_experts": 2, "num_uni_experts": 2, "num_skip": 2, "reduction": 2,
            "load_balance_weight": 0.01}.items() <= ms3["backbone"]["adapter"].items()
    assert ms3["head"]["gamma"] == 0.1 and ms3["loss"]["masked_av_weight"] == 0.5 and ms3["optim"]["lr"] == 1.5e-4
    assert ms3_cfg["data"]["init_args"]["setting"] == "ms3"
    assert ms3_cfg["trainer"]["callbacks"][0]["class_path"].endswith("AVSMaskImages")


# ---- end to end ---------------------------------------------------------------------------------------------------
SIZE = 64  # synthetic frames and masks for the fits (the data tests cover the official 224)
MS3_OVERLAY = """
model:
  init_args:
    backbone:
      adapter: {num_cross_experts: 2, num_uni_experts: 2, uni_expert: latent, reduction: 2, num_skip: 2,
                load_balance_weight: 0.01}
    head: {gamma: 0.1}
    loss: {masked_av_weight: 0.5}
data:
  init_args: {setting: ms3}
"""


def _baseline(root: Path, setting: str) -> dict[str, float]:
    """Official M_J / M_F of predicting background everywhere on the test split."""
    dm = AVSBenchDataModule(str(root), setting=setting, num_workers=0, image_size=SIZE, mask_size=SIZE)
    dm.setup("test")
    metric = AVSMetric()
    for batch in dm.test_dataloader():
        target = batch["mask"][:, :, 0]
        metric.update(batch["index"], torch.full_like(target, -10.0), target, batch["mask_valid"])
    return {k: v.item() for k, v in metric.compute().items()}


def _fit(root: Path, run_root: Path, name: str, epochs: int, *extra: str) -> dict[str, float]:
    run_cli(["fit", "--config", str(CONFIGS / "demo_avs.yaml"), *extra,
             f"--data.init_args.root={root}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
             f"--data.init_args.image_size={SIZE}", f"--data.init_args.mask_size={SIZE}",
             f"--model.init_args.head.mask_size={SIZE}", "--model.init_args.optim.lr=5e-3",
             f"--run.root={run_root}", f"--run.name={name}", f"--trainer.max_epochs={epochs}",
             "--trainer.enable_progress_bar=false", "--run.test_after_fit=true"])
    return json.loads((run_root / name / "metrics" / "test.json").read_text())["metrics"]


def _logged_masks(folder: Path) -> np.ndarray:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    assert "val/masks" in acc.Tags()["images"], acc.Tags()
    event = acc.Images("val/masks")[-1]
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


@pytest.mark.slow
def test_s4_fit_beats_the_all_background_baseline(tmp_path):
    from avmoe.datamodules.synthetic.avsbench import write_avsbench_release

    root = write_avsbench_release(tmp_path / "s4", "s4", num_train=16, num_val=4, num_test=4, size=SIZE, seed=0)
    metrics = _fit(root, tmp_path / "runs", "s4", 4)
    base = _baseline(root, "s4")
    assert metrics["test/mj"] > base["mj"] + 0.05, (metrics, base)
    assert metrics["test/mf"] > base["mf"] + 0.05, (metrics, base)
    image = _logged_masks(tmp_path / "runs" / "s4")
    assert image.shape[:2] == (2 * SIZE, 5 * SIZE)  # demo: 2 clips x 5 frames, drawn during validation
    best = AVSTask.load_from_checkpoint(tmp_path / "runs" / "s4" / "checkpoints" / "best.ckpt").eval()
    assert best.head_config.mask_size == SIZE and best.visual_only_eval is False


@pytest.mark.slow
def test_ms3_fit_beats_the_all_background_baseline(tmp_path):
    from avmoe.datamodules.synthetic.avsbench import write_avsbench_release

    root = write_avsbench_release(tmp_path / "ms3", "ms3", num_train=12, num_val=4, num_test=4, size=SIZE, seed=0)
    overlay = tmp_path / "ms3.yaml"
    overlay.write_text(MS3_OVERLAY)
    metrics = _fit(root, tmp_path / "runs", "ms3", 3, "--config", str(overlay))
    base = _baseline(root, "ms3")
    assert base["mj"] > 0, "the MS3 test split has empty-GT frames, which all-background scores as 1"
    assert metrics["test/mj"] > base["mj"] + 0.05, (metrics, base)
    assert metrics["test/mf"] > base["mf"] + 0.05, (metrics, base)
    assert _logged_masks(tmp_path / "runs" / "ms3").shape[:2] == (2 * SIZE, 5 * SIZE)
