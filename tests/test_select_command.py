"""``lightning select`` end to end on a generated AVE release, the split-file writers of every release, the
2-process feature gather and the bad-input errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from avmoe.cli import cli_main
from avmoe.datamodules import AVEDataModule, AVSBenchDataModule, LLPDataModule, MusicAVQADataModule
from avmoe.models.avmoe import AVMoEBackbone
from avmoe.models.presets import tiny_config
from avmoe.select.features import embed_pool, pooled_features
from avmoe.select.splits import build_pool, write_selected_root
from avmoe.select.strategies import select_order
from tests.helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


def select_args(root, run_dir, *extra: str) -> list[str]:
    return ["select", "--config", str(CONFIGS / "select" / "demo.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.num_workers=0", f"--select.run_dir={run_dir}", "--select.stage1.epochs=3", *extra]


@pytest.mark.slow
def test_select_writes_nested_ave_subsets_that_train_configs_read(ave_release, tmp_path):
    run = tmp_path / "run"
    cli_main(select_args(ave_release, run, "--select.budget=[4, 8]"))
    report = json.loads((run / "selection.json").read_text())
    assert report["budgets"] == [4, 8] and len(report["order"]) == 8 and report["pool_size"] == 16
    gaps = report["stage1"]
    assert {"gap_before", "gap_after", "gap_after_without_prototypes"} <= set(gaps)
    ranked = sorted((s for s in report["samples"] if s["rank"] is not None), key=lambda s: s["rank"])
    assert [s["id"] for s in ranked] == report["order"] and all("typicality" in s for s in report["samples"])
    chosen = {}
    for budget in (4, 8):
        dm = AVEDataModule(str(run / f"budget_{budget}"), num_workers=0, image_size=64)
        ds = dm.dataset("train")
        chosen[budget] = set(ds.video_ids.tolist())
        assert len(ds) == budget and chosen[budget] == set(report["order"][:budget])
        assert dm.dataset_size("val") == 6 and dm.dataset_size("test") == 8  # other splits untouched
        sample = ds[0]  # the mirror's video links decode
        assert sample["video"].shape[0] == 10
    assert chosen[4] < chosen[8]
    # a second strategy on the same run folder reuses the cached features (no backbone pass)
    stamp = os.stat(run / "features" / "pool.pt").st_mtime_ns
    cli_main(select_args(ave_release, run, "--select.budget=3", "--select.strategy=kcenter",
                         "--select.features=stage1", "--select.view=audio"))
    assert os.stat(run / "features" / "pool.pt").st_mtime_ns == stamp
    again = json.loads((run / "selection.json").read_text())
    assert len(again["order"]) == 3 and again["strategy"] == "kcenter" and "gap_after" in again["stage1"]


@pytest.mark.parametrize("config", sorted((CONFIGS / "select").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_select_config_parses(config):
    from avmoe.select.command import build_parser

    cfg = build_parser().parse_args(["--config", str(config), "--data.init_args.root=unused"])
    assert cfg.select.strategy == "mmcsal" and cfg.data.class_path.startswith("avmoe.datamodules.")


def test_select_rejects_a_budget_larger_than_the_pool(ave_release, tmp_path):
    with pytest.raises(ValueError, match=r"budget 17 is larger than the pool \(16 samples"):
        cli_main(select_args(ave_release, tmp_path / "run", "--select.budget=17"))


@pytest.mark.parametrize("case", ["llp", "avs", "avqa"])
def test_split_writers_round_trip_through_the_datamodules(case, request, tmp_path):
    root = request.getfixturevalue({"llp": "llp_release", "avs": "avs_release", "avqa": "avqa_release"}[case])
    make = {"llp": lambda r: LLPDataModule(str(r), num_workers=0),
            "avs": lambda r: AVSBenchDataModule(str(r), setting="s4", num_workers=0),
            "avqa": lambda r: MusicAVQADataModule(str(r), num_workers=0, negatives=False)}[case]
    dm = make(root)
    pool = build_pool(dm)
    picks = np.array([len(pool.ids) - 1, 0, 2])
    write_selected_root(dm, pool, picks, tmp_path / "sub")
    sub = make(tmp_path / "sub")
    ds = sub.dataset("train")
    ids = {"llp": lambda d: d.filenames, "avs": lambda d: d.video_ids, "avqa": lambda d: d.video_ids}[case]
    assert set(map(str, ids(ds))) == {pool.ids[i] for i in picks}
    if case == "avqa":  # every train question of a chosen video, none of the others
        full = dm.read_split("train")
        assert len(ds) == int(full["video_id"].isin([pool.ids[i] for i in picks]).sum())
        assert sub.num_answers == dm.num_answers  # vocabularies still from the full json/avqa-train.json
    else:
        assert len(ds) == 3
    assert sub.dataset_size("test") == dm.dataset_size("test")


class FakeClips(torch.utils.data.Dataset):
    """In-memory clips in the batch contract (the gather test needs no decoding)."""

    def __init__(self, n: int, drop_audio: int = -1) -> None:
        g = torch.Generator().manual_seed(0)
        self.video = torch.randint(0, 255, (n, 2, 3, 64, 64), generator=g, dtype=torch.uint8)
        self.audio = torch.randn(n, 2, 101, 32, generator=g)
        self.drop_audio = drop_audio

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "audio": self.audio[i], "index": torch.tensor(i),
                "audio_mask": torch.tensor(0.0 if i == self.drop_audio else 1.0), "visual_mask": torch.tensor(1.0)}


class CountingBackbone(torch.nn.Module):
    """The tiny AVMoE backbone, counting its calls and optionally failing at call ``fail_at``."""

    def __init__(self, fail_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = AVMoEBackbone(tiny_config(adapter={"num_latents": 4, "reduction": 4, "router_hidden": [16, 8]}))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, video, audio):
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.inner(video, audio)


def _embed(n: int, cache, backbone=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    ids = [f"clip{i}" for i in range(n)]
    return embed_pool(backbone or CountingBackbone(), FakeClips(n), np.arange(n), ids, cache, batch_size=2, **kwargs)


def test_embedding_resumes_from_its_shard_and_reuses_the_pool_cache(tmp_path):
    audio, visual = _embed(7, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # killed after 2 of the 4 batches, flushed every batch
        _embed(7, tmp_path / "cut", CountingBackbone(fail_at=2), flush_every=1)
    resumed = CountingBackbone()
    got = _embed(7, tmp_path / "cut", resumed)
    assert resumed.calls == 2  # only the two missing batches
    assert np.array_equal(got[0], audio) and np.array_equal(got[1], visual)
    cached = CountingBackbone()
    assert np.array_equal(_embed(7, tmp_path / "cut", cached)[0], audio) and cached.calls == 0


@pytest.mark.ddp
def test_features_and_selection_are_the_same_on_one_and_two_processes(tmp_path):
    from tests.select_gather_worker import gather_worker

    audio1, visual1 = _embed(7, tmp_path / "one")
    # the batches a 2-process run embeds are the 1-process batches (fixed batching, batch k -> rank k mod 2)
    every = {k: (torch.from_numpy(audio1[2 * k:2 * k + 2]), torch.from_numpy(visual1[2 * k:2 * k + 2]))
             for k in range(4)}
    torch.save(every, tmp_path / "batches.pt")
    mp.spawn(gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "batches.pt"), str(tmp_path / "out")),
             nprocs=2, join=True)
    for rank, mine in ((0, [0, 2]), (1, [1, 3])):
        got = torch.load(tmp_path / f"out{rank}.pt", weights_only=True)
        assert got["mine"] == mine
        assert np.array_equal(got["audio"].numpy(), audio1) and np.array_equal(got["visual"].numpy(), visual1)
    assert np.array_equal(select_order("mmcsal", audio1, visual1, [3], seed=0),
                          select_order("mmcsal", got["audio"].numpy(), got["visual"].numpy(), [3], seed=0))
    # a batch embedded alone equals the same batch inside the 1-process loop (what makes the shards identical)
    clips = FakeClips(7)
    batch = {k: torch.stack([clips[i][k] for i in (2, 3)]) for k in clips[0]}
    alone = pooled_features(CountingBackbone().eval(), batch, ["clip2", "clip3"])
    assert torch.equal(alone[0], every[1][0]) and torch.equal(alone[1], every[1][1])


def test_stage1_through_the_backbone_trains_only_the_adapters_and_is_reused(tmp_path):
    from lightning.fabric import Fabric

    from avmoe.select.adapters import WEIGHTS_FILE, train_adapters
    from avmoe.select.stage1 import Stage1Config

    fabric = Fabric(accelerator="cpu", devices=1)
    backbone = CountingBackbone()
    before = {k: v.clone() for k, v in backbone.inner.state_dict().items()}
    cfg = Stage1Config(dim=16, hidden=32, num_prototypes=2)
    log: list[dict] = []
    train_adapters(fabric, backbone.inner, FakeClips(8), np.arange(8), 2, cfg, tmp_path, batch_size=4, log=log)
    changed = {k for k, v in backbone.inner.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("adapters.") for k in changed)  # encoders stay frozen
    assert [r["epoch"] for r in log] == [0, 1] and all(np.isfinite(r["loss"]) and r["gap"] > 0 for r in log)
    assert (tmp_path / WEIGHTS_FILE).is_file()
    trained = {k: v.clone() for k, v in backbone.inner.state_dict().items()}
    with torch.no_grad():  # spoil the adapters: a rerun must restore them from the file, not train again
        for p in backbone.inner.adapters.parameters():
            p.zero_()
    train_adapters(fabric, backbone.inner, FakeClips(8), np.arange(8), 2, cfg, tmp_path, batch_size=4)
    assert all(torch.equal(v, trained[k]) for k, v in backbone.inner.state_dict().items())


def test_a_pool_sample_without_audio_is_an_error():
    backbone = AVMoEBackbone(tiny_config(adapter={"num_latents": 4, "reduction": 4, "router_hidden": [16, 8]}))
    clips = FakeClips(3, drop_audio=1)
    batch = {k: torch.stack([clips[i][k] for i in range(3)]) for k in clips[0]}
    with pytest.raises(ValueError, match=r"\['b'\] have no audio"):
        pooled_features(backbone, batch, ["a", "b", "c"])


def test_an_empty_pool_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        embed_pool(torch.nn.Identity(), FakeClips(0), np.zeros(0, dtype=np.int64), [], tmp_path)
