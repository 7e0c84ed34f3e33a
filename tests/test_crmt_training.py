"""CRMT training through the CLI (stage 1 -> stage 2 with --run.init_from -> test) and its pieces on a task."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from avmoe.callbacks.crmt import CRMT, crmt_fusion
from tests.helpers import CONFIGS, ave_batch, task_fit_args
from tests.test_callbacks import imbalanced_release  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def crmt_task():
    from avmoe.models.heads.ave import AVEHeadConfig
    from avmoe.models.presets import tiny_config
    from avmoe.tasks.ave import AVETask

    torch.manual_seed(0)
    head = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2,
                         num_classes=3)
    return AVETask(backbone=tiny_config(), head=head, crmt=True)


def test_tasks_without_a_linear_fusion_head_fail_clearly(crmt_task):
    with pytest.raises(ValueError, match="crmt: true"):  # AVE without the option
        crmt_fusion(_NoCRMT(with_attr=True))
    with pytest.raises(ValueError, match="not a linear fusion"):
        crmt_fusion(_NoCRMT(with_attr=False))
    assert crmt_fusion(crmt_task) is crmt_task.crmt_fusion


class _NoCRMT(torch.nn.Module):
    def __init__(self, with_attr: bool) -> None:
        super().__init__()
        if with_attr:
            self.crmt_fusion = None


def test_crmt_class_is_the_orthogonal_fusion_and_the_margin_joins_the_loss(crmt_task):
    batch = ave_batch(crmt_task)
    crmt_task.train()
    _, out = crmt_task(batch)
    uni, fused, labels, rows = crmt_task.crmt_logits(out, batch)
    a = crmt_task.crmt_fusion.a
    assert torch.allclose(fused, a["audio"] * uni["audio"] + a["visual"] * uni["visual"]
                          + crmt_task.crmt_fusion.fc.bias, atol=1e-6)
    callback = CRMT(stage=1)
    losses = callback._loss_hook(crmt_task, out, batch, {"loss_task": torch.tensor(1.0)})
    assert set(losses) == {"loss_task", "loss_crmt_margin"} and float(losses["loss_crmt_margin"]) != 0
    stage2 = CRMT(stage=2)._loss_hook(crmt_task, out, batch, {"loss_task": torch.tensor(1.0)})
    assert set(stage2) == {"loss_crmt_bound"}  # stage 2 trains on the bound alone


def test_crmt_at_perturbs_the_inputs_within_the_box(crmt_task):
    batch = ave_batch(crmt_task)
    clean_audio = batch["audio"].clone()
    clean_video = batch["video"].float() / 255
    CRMT(stage=1, adversarial=True, at_eps=0.1, at_steps=2).on_train_batch_start(None, crmt_task, batch, 0)
    da = batch["audio"] - clean_audio
    std = crmt_task.backbone.pixel_std.view(1, 1, 3, 1, 1)
    dv = (batch["video"] - clean_video) / std  # normalised units, where the official clamp acts
    assert da.abs().max() <= 0.2 + 1e-5 and dv.abs().max() <= 0.2 + 1e-4
    assert da.abs().max() > 0 and dv.abs().max() > 0


@pytest.mark.slow
def test_two_stage_crmt_through_the_cli(ave_release, tmp_path):
    from avmoe.cli import cli_main

    runs = tmp_path / "runs"
    common = {"trainer.limit_val_batches": 0, "trainer.max_steps": 2, "model.init_args.head.num_classes": 3}
    cli_main(["fit", *task_fit_args("ave", ave_release, runs, name="s1", **common),
              "--config", str(CONFIGS / "callbacks" / "crmt_stage1.yaml")])
    s1 = runs / "s1" / "checkpoints" / "last.ckpt"
    cli_main(["fit", *task_fit_args("ave", ave_release, runs, name="s2", **common),
              "--config", str(CONFIGS / "callbacks" / "crmt_stage2.yaml"), f"--run.init_from={s1}",
              "--trainer.callbacks.init_args.lipschitz_batches=1"])
    s2 = runs / "s2" / "checkpoints" / "last.ckpt"
    before = torch.load(s1, weights_only=True)["state_dict"]
    after = torch.load(s2, weights_only=True)["state_dict"]
    changed = {k for k in after if not torch.equal(before[k], after[k])
               and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}  # BN statistics move
    assert changed == {"crmt_fusion.a.audio", "crmt_fusion.a.visual", "crmt_fusion.lipschitz"}, changed  # only a^m
    assert (after["crmt_fusion.lipschitz"] > 0).all()
    args = [a for a in task_fit_args("ave", ave_release, runs, name="s2", **{"model.init_args.head.num_classes": 3})
            if not a.startswith(("--trainer.max_", "--run.test_after_fit"))]
    cli_main(["test", *args, "--config", str(CONFIGS / "callbacks" / "crmt_stage2.yaml"), "--ckpt_path", str(s2)])
    payload = json.loads((runs / "s2" / "metrics" / "test_test.json").read_text())
    metrics = payload["metrics"]
    assert "test/crmt_bound" in metrics and torch.isfinite(torch.tensor(metrics["test/crmt_bound"]))
    assert payload["files"] == {"crmt_bound": "crmt_bound_test_test.csv"}  # every test clip's bound, named
    with open(runs / "s2" / "metrics" / "crmt_bound_test_test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_ids = [line.split("&")[1] for line in (ave_release / "testSet.txt").read_text().splitlines() if line.strip()]
    assert sorted(r["video_id"] for r in rows) == sorted(test_ids)  # each clip of the test split once
    assert sum(float(r["bound"]) for r in rows) / len(rows) == pytest.approx(metrics["test/crmt_bound"], rel=1e-5)


# ------------------------------------------------------------------------------------------- DDP and resume
def _crmt_task(seed: int = 0):
    from avmoe.models.presets import tiny_config
    from avmoe.tasks.ave import AVETask
    from avmoe.tasks.base import OptimConfig
    from tests.test_callbacks import HEAD

    torch.manual_seed(seed)
    return AVETask(backbone=tiny_config(), head=HEAD, optim=OptimConfig(lr=1e-2, step_size=None), crmt=True)


@pytest.mark.slow
@pytest.mark.ddp
def test_stage2_under_ddp_all_reduces_the_lipschitz_constants(imbalanced_release, tmp_path):
    """2-process DDP (spawn): the replicas stay identical and the stored constants are the max over the whole
    training set (every rank's shard), the same as one process estimating them on all of it."""
    import lightning as L
    from types import SimpleNamespace

    from avmoe.callbacks import ParameterChecksum
    from tests.test_callbacks import make_datamodule
    from tests.test_callbacks_ddp import _digests

    callback = CRMT(stage=2)
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[callback, ParameterChecksum(dirpath=str(tmp_path / "sums"), every_n_steps=1)])
    task = _crmt_task()
    trainer.fit(task, make_datamodule(imbalanced_release, batch_size=2))
    rank0, rank1 = _digests(tmp_path / "sums")
    assert len(rank0) >= 2 and rank0 == rank1
    single = _crmt_task()  # the same initial weights, one process, the whole training set
    dm = make_datamodule(imbalanced_release, batch_size=2)
    dm.setup("fit")
    expected = CRMT(stage=2).estimate_lipschitz(SimpleNamespace(datamodule=dm), single)
    torch.testing.assert_close(task.crmt_fusion.lipschitz, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_stage2_resume_continues_identically_without_re_estimating(imbalanced_release, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.test_callbacks import make_datamodule, make_trainer

    def fit(root, epochs, ckpt=None):
        task, callback = _crmt_task(), CRMT(stage=2, lipschitz_batches=1)
        calls = []
        original = callback.estimate_lipschitz
        callback.estimate_lipschitz = lambda *a: calls.append(1) or original(*a)
        checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)
        trainer = make_trainer(root, [callback, checkpoint], max_epochs=epochs, enable_checkpointing=True)
        trainer.fit(task, make_datamodule(imbalanced_release, batch_size=4, seeded=True), ckpt_path=ckpt)
        return task, calls

    straight, calls_a = fit(tmp_path / "a", 2)
    fit(tmp_path / "b", 1)
    resumed, calls_b = fit(tmp_path / "b", 2, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert calls_a == [1] and calls_b == []  # the resumed run takes the constants from its checkpoint
    for (name, p_a), p_b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p_b, p_a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(straight.crmt_fusion.a["audio"], _crmt_task().crmt_fusion.a["audio"])
