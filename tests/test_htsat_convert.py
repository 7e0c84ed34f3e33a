"""Original HTS-AT checkpoint -> ClapAudioModel: numerical equality against an independent reference model.

The reference below restates the original HTS-AT (RetroCirce/HTS-Audio-Transformer ``model/htsat.py``) with its
original parameter names: Swin-V1 pre-norm blocks with a fused ``qkv`` and a ``relative_position_bias_table``,
shifted windows with a -100 mask, PatchMerging with LayerNorm(4C) before the reduction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ClapAudioModel

from avmoe.models.backbones import htsat
from avmoe.models.backbones.convert_htsat import convert_htsat_state_dict, load_htsat_checkpoint
from avmoe.models.config import AudioEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = AudioEncoderConfig(
    num_mel_bins=32, spec_size=128, patch_size=4, hidden_size=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
    window_size=4,
)  # grids 32/16/8/4: shifted windows with masks in stages 0-2, window == grid (no shift) in stage 3


# ------------------------------------------------------------------------------------------- reference HTS-AT
def _partition(x: Tensor, w: int) -> Tensor:
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


def _reverse(win: Tensor, w: int, h: int, wd: int) -> Tensor:
    b = win.shape[0] // (h * wd // w // w)
    return win.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            attn = (attn.view(b // mask.shape[0], mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(
                -1, self.heads, n, n
            )
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int], heads: int, window: int, shift: int) -> None:
        super().__init__()
        if min(res) <= window:  # the original clamps the window to the grid and drops the shift
            window, shift = min(res), 0
        self.res, self.window, self.shift = res, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = WindowAttention(dim, window, heads), Mlp(dim)
        mask = None
        if shift > 0:
            img = torch.zeros(1, *res, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((h, w) for h in cuts for w in cuts):
                img[:, hs, ws, :] = i
            mw = _partition(img, window).view(-1, window * window)
            mask = (mw.unsqueeze(1) - mw.unsqueeze(2)).ne(0).float() * -100.0
        self.register_buffer("attn_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        (h, w), b, c = self.res, x.shape[0], x.shape[2]
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn(_partition(y, self.window).view(-1, self.window**2, c), self.attn_mask)
        y = _reverse(y.view(-1, self.window, self.window, c), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, res: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.res = res
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        (h, w), b, c = self.res, x.shape[0], x.shape[2]
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int], depth: int, heads: int, window: int, last: bool) -> None:
        super().__init__()
        shifts = [0 if i % 2 == 0 else window // 2 for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, res, heads, window, shift) for shift in shifts)
        self.downsample = None if last else PatchMerging(res, dim)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(1, dim, patch, patch), nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ReferenceHTSAT(nn.Module):
    """The original module tree, including the parts the converter must drop (front-end, tscam_conv, head)."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.freq_ratio = cfg.spec_size // cfg.num_mel_bins
        self.spec_size = cfg.spec_size
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = nn.Module()
        self.spectrogram_extractor.stft.conv_real = nn.Conv1d(1, 5, 8, bias=False)
        self.spectrogram_extractor.stft.conv_imag = nn.Conv1d(1, 5, 8, bias=False)
        self.logmel_extractor = nn.Module()
        self.logmel_extractor.melW = nn.Parameter(torch.rand(5, cfg.num_mel_bins))
        self.bn0 = nn.BatchNorm2d(cfg.num_mel_bins)
        self.patch_embed = PatchEmbed(cfg.hidden_size, cfg.patch_size)
        grid = cfg.spec_size // cfg.patch_size
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            Stage(cfg.hidden_size * 2**i, (grid // 2**i, grid // 2**i), d, h, cfg.window_size, i == n - 1)
            for i, (d, h) in enumerate(zip(cfg.depths, cfg.num_heads))
        )
        self.norm = nn.LayerNorm(cfg.hidden_size * 2 ** (n - 1))
        self.tscam_conv = nn.Conv2d(self.norm.normalized_shape[0], 7, (2, 3), padding=(0, 1))
        self.head = nn.Linear(7, 7)

    def reshape_wav2img(self, x: Tensor) -> Tensor:
        t, f = int(self.spec_size * self.freq_ratio), self.spec_size // self.freq_ratio
        x = F.interpolate(x, (t, x.shape[3]), mode="bicubic", align_corners=True)
        x = x.permute(0, 1, 3, 2).reshape(x.shape[0], 1, f, self.freq_ratio, t // self.freq_ratio)
        return x.permute(0, 1, 3, 2, 4).reshape(x.shape[0], 1, f * self.freq_ratio, t // self.freq_ratio)

    def tokens(self, mel: Tensor) -> Tensor:
        """Log-mel (M, 1, T, mels) -> last-stage tokens (no final norm), as AVMoE uses HTS-AT."""
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        x = self.patch_embed(self.reshape_wav2img(x))
        for stage in self.layers:
            for blk in stage.blocks:
                x = blk(x)
            x = x if stage.downsample is None else stage.downsample(x)
        return x


def _randomise(model: nn.Module) -> None:
    """Every parameter and BN statistic random, so a mis-mapped key cannot hide."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.data = torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.2) + (1.0 if "norm" in name else 0.0)
    model.bn0.running_mean.normal_(0, 1, generator=g)
    model.bn0.running_var.uniform_(0.5, 2.0, generator=g)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReferenceHTSAT, ClapAudioModel, Path]:
    torch.manual_seed(0)
    ref = ReferenceHTSAT(CFG).eval()
    _randomise(ref)
    path = tmp_path_factory.mktemp("htsat") / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save({"state_dict": {"sed_model." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    model = ClapAudioModel(htsat.clap_audio_config(CFG)).eval()
    load_htsat_checkpoint(path, model)
    return ref, model, path


# ------------------------------------------------------------------------------------------------------- tests
def test_every_block_matches(pair: tuple[ReferenceHTSAT, ClapAudioModel, Path]) -> None:
    ref, model, _ = pair
    grids = htsat.stage_grids(model)
    shifted = 0
    for s, (ref_stage, stage) in enumerate(zip(ref.layers, model.audio_encoder.layers)):
        for ref_blk, blk in zip(ref_stage.blocks, stage.blocks):
            x = torch.randn(2, grids[s][0] * grids[s][1], ref_blk.norm1.normalized_shape[0])
            with torch.no_grad():
                torch.testing.assert_close(htsat.block(blk, x, grids[s]), ref_blk(x), rtol=1e-5, atol=1e-5)
            shifted += ref_blk.shift > 0
        if ref_stage.downsample is not None:
            x = torch.randn(2, grids[s][0] * grids[s][1], ref_stage.downsample.norm.normalized_shape[0] // 4)
            with torch.no_grad():
                out, _ = htsat.downsample(stage, x, grids[s])
                torch.testing.assert_close(out, ref_stage.downsample(x), rtol=1e-5, atol=1e-5)
    assert shifted == 3  # the masked shifted-window path was exercised (stages 0-2)


def test_full_forward_matches(pair: tuple[ReferenceHTSAT, ClapAudioModel, Path]) -> None:
    ref, model, _ = pair
    mel = torch.randn(2, 1, 101, CFG.num_mel_bins)
    with torch.no_grad():
        expected = ref.tokens(mel)
        stepped = htsat.embed(model, mel)[0]
        for s, stage in enumerate(model.audio_encoder.layers):
            for blk in stage.blocks:
                stepped = htsat.block(blk, stepped, htsat.stage_grids(model)[s])
            stepped, _ = htsat.downsample(stage, stepped, htsat.stage_grids(model)[s])
        library = htsat.library_tokens(model, mel)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(library, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.audio_encoder.norm(library), ref.norm(expected), rtol=1e-5, atol=1e-5)


def test_roundtrip_is_strict_and_complete(pair: tuple[ReferenceHTSAT, ClapAudioModel, Path]) -> None:
    ref, model, path = pair
    converted = convert_htsat_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert set(converted) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key
    assert not any(k in key for key in converted for k in ("attn_mask", "tscam", "head", "extractor", "qkv"))
    # the unprefixed state dict converts the same way
    assert set(convert_htsat_state_dict(ref.state_dict())) == set(converted)


def test_build_from_checkpoint_config(pair: tuple[ReferenceHTSAT, ClapAudioModel, Path]) -> None:
    _, model, path = pair
    loaded = htsat.build_htsat(AudioEncoderConfig(**{**CFG.__dict__, "htsat_checkpoint": str(path)}))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatch_lists_keys(pair: tuple[ReferenceHTSAT, ClapAudioModel, Path], tmp_path: Path) -> None:
    _, model, path = pair
    sd = torch.load(path, weights_only=True)["state_dict"]
    del sd["sed_model.layers.1.blocks.0.norm2.weight"]
    sd["sed_model.layers.1.blocks.0.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(RuntimeError) as err:
        load_htsat_checkpoint(bad, ClapAudioModel(htsat.clap_audio_config(CFG)))
    msg = str(err.value)
    assert "audio_encoder.layers.1.blocks.0.layernorm_after.weight" in msg and "missing" in msg
    assert "audio_encoder.layers.1.blocks.0.extra.weight" in msg and "unexpected" in msg
    with pytest.raises(FileNotFoundError):
        load_htsat_checkpoint(tmp_path / "nope.ckpt", model)
