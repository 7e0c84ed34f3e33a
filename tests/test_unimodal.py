"""Uni-modal predictions as a config choice (``unimodal.mode``): zeroed features or auxiliary heads, every task."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import lightning
import pytest
import torch

from avmoe.callbacks import OGMGE, ModalityValuation
from avmoe.models.presets import tiny_config
from avmoe.tasks import AVETask, AVQATask, AVSTask, AVVPTask
from avmoe.tasks.base import AVTask, UnimodalConfig
from tests import test_ave_task as ave
from tests import test_avqa_task as avqa
from tests import test_avs_task as avs
from tests import test_avvp_task as avvp
from tests.helpers import CONFIGS
from tests.test_callbacks import imbalanced_release, make_datamodule, make_trainer  # noqa: F401  (fixture)

AUX = UnimodalConfig(mode="aux")


def _ave(unimodal: UnimodalConfig) -> AVTask:
    return AVETask(backbone=tiny_config(), head=ave.TINY_HEAD, unimodal=unimodal)


def _avvp(unimodal: UnimodalConfig) -> AVTask:
    return AVVPTask(backbone=avvp.tiny_avvp_backbone(), head=avvp.TINY_HEAD, unimodal=unimodal)


def _avs(unimodal: UnimodalConfig) -> AVTask:
    return AVSTask(backbone=tiny_config(), head=avs.TINY_HEAD, unimodal=unimodal)


def _avqa(unimodal: UnimodalConfig) -> AVTask:
    return AVQATask(backbone=avqa.tiny_backbone(), head=avqa.TINY_HEAD, unimodal=unimodal,
                    answer_vocab=avqa.ANSWERS, question_vocab=avqa.WORDS)


CASES: dict[str, tuple[Callable[[UnimodalConfig], AVTask], Callable[[Any], dict]]] = {
    "ave": (_ave, ave.tiny_batch),
    "avvp": (_avvp, avvp.tiny_batch),
    "avs": (_avs, avs._batch),
    "avqa": (_avqa, avqa.tiny_batch),
}


def build(name: str, unimodal: UnimodalConfig = AUX) -> tuple[AVTask, dict]:
    make_task, make_batch = CASES[name]
    torch.manual_seed(0)
    task = make_task(unimodal)
    return task, make_batch(task)


@pytest.mark.parametrize("name", CASES)
def test_aux_heads_score_each_modality_from_its_own_features(name):
    task, batch = build(name)
    task.eval()
    with torch.no_grad():
        feats = task.encode(batch)
        uni = task.unimodal_outputs(feats, batch)
        zeroed = task.unimodal_outputs(feats, batch, mode="zero")
        noisy = replace(feats, visual=torch.randn_like(feats.visual), visual_tokens=torch.randn_like(feats.visual_tokens))
        uni_noisy = task.unimodal_outputs(noisy, batch)
    b = feats.batch_size
    for m in ("audio", "visual"):
        scores, correct = task.sample_scores(uni[m], batch), task.sample_correct(uni[m], batch)
        assert scores.shape == (b,) and correct.shape == (b,)
        assert ((scores >= 0) & (scores <= 1)).all() and ((correct >= 0) & (correct <= 1)).all()
        assert not torch.allclose(scores, task.sample_scores(zeroed[m], batch)), "aux heads are not the zero probe"
    for key, value in uni["audio"].items():  # the audio head never reads visual features
        assert torch.equal(value, uni_noisy["audio"][key]), key
    assert any(not torch.equal(v, uni_noisy["visual"][k]) for k, v in uni["visual"].items())


@pytest.mark.parametrize("name", CASES)
def test_aux_losses_train_the_heads_and_reach_the_backbone_unless_detached(name):
    for detach in (False, True):
        task, batch = build(name, UnimodalConfig(mode="aux", detach=detach))
        task.train()
        losses = task.unimodal_losses(task.encode(batch), batch)
        assert set(losses) == {"loss_aux_audio", "loss_aux_visual"}
        torch.stack(list(losses.values())).sum().backward()
        aux = list(task.unimodal_heads.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux if p.dim() > 1)
        groups = task.modality_parameters()
        grouped = {id(p) for ps in groups.values() for p in ps}
        assert not grouped & {id(p) for p in aux}, "auxiliary classifiers belong to no modality group"
        adapters = [p for ps in groups.values() for p in ps if p.grad is not None and p.grad.abs().sum() > 0]
        if detach:
            assert not adapters, "detached probes must not train the backbone"
        else:
            assert adapters, "the auxiliary losses train the modality's adapters"


def test_aux_loss_leaves_out_samples_without_their_modality():
    task, batch = build("ave", UnimodalConfig(mode="aux", aux_weight=0.5))
    task.train()
    batch["audio_mask"] = torch.tensor([0.0, 1.0])
    feats = task.encode(batch)
    assert feats.present("audio").tolist() == [False, True] and feats.present("visual").all()
    per_sample = task.unimodal_sample_loss("audio", task.unimodal_head_forward("audio", feats, batch), batch)
    losses = task.unimodal_losses(feats, batch)
    assert losses["loss_aux_audio"].item() == pytest.approx(0.5 * per_sample[1].item(), rel=1e-6)

    batch["audio_mask"] = torch.zeros(2)
    losses = task.unimodal_losses(task.encode(batch), batch)
    assert losses["loss_aux_audio"].item() == 0.0
    losses["loss_aux_audio"].backward()  # still in the graph: every rank's DDP reducer sees the parameters
    assert all(p.grad is not None for p in task.unimodal_heads["audio"].parameters())


@pytest.mark.parametrize("name", CASES)
def test_aux_heads_round_trip_through_a_checkpoint(name, tmp_path):
    task, _ = build(name)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = type(task).load_from_checkpoint(path, weights_only=True)
    assert loaded.unimodal.mode == "aux"
    for key, value in task.unimodal_heads.state_dict().items():
        assert torch.equal(value, loaded.unimodal_heads.state_dict()[key]), key


def test_mode_is_checked():
    with pytest.raises(ValueError, match="unimodal.mode"):
        UnimodalConfig(mode="heads")
    task, batch = build("ave", UnimodalConfig())
    assert task.unimodal_heads is None
    with pytest.raises(RuntimeError, match="auxiliary heads are not built"):
        task.unimodal_outputs(task.encode(batch), batch, mode="aux")


@pytest.mark.slow
def test_fit_with_aux_heads_and_balancing_callbacks(imbalanced_release, tmp_path):
    """OGM-GE reads the auxiliary heads' scores; valuation can use them too (``unimodal="task"``)."""
    task, _ = build("ave")
    task.optim = replace(task.optim, lr=1e-2, step_size=None)
    seen = []

    class Spy(lightning.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append(pl_module.unimodal_heads["audio"]["cls"].linear.weight.grad.abs().sum().item())

    valuation = ModalityValuation(warmup_epochs=1, unimodal="task", log_histograms=False)
    trainer = make_trainer(tmp_path, [OGMGE(alpha=1.0, noise=False, end_epoch=None), valuation, Spy()],
                           max_epochs=2, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(task, make_datamodule(imbalanced_release, batch_size=4))
    metrics = trainer.callback_metrics
    assert {"train/loss_aux_audio", "train/loss_aux_visual", "ogm/k_audio", "ogm/k_visual",
            "val/unimodal_audio", "val/unimodal_visual"} <= set(metrics)
    assert seen and all(g > 0 for g in seen)
    assert valuation.table is not None and valuation.summary


def test_valuation_takes_the_task_predictions_only_when_asked():
    task, batch = build("avqa")  # single-label: correctness is 0/1 per question
    task.eval()
    batch["answer"] = torch.tensor([0, 1])
    with torch.no_grad():
        feats = task.encode(batch)
        for m in ("audio", "visual"):  # make the auxiliary heads answer 1 and the task head answer 0
            task.unimodal_heads[m]["classifier"].bias.data[1] = 100.0
        task.head.classifier.bias.data[0] = 100.0
        expected = {mode: [task.sample_correct(task.unimodal_outputs(feats, batch, mode)[m], batch).tolist()
                           for m in ("audio", "visual")] for mode in ("zero", "aux")}
        assert expected == {"zero": [[1.0, 0.0]] * 2, "aux": [[0.0, 1.0]] * 2}
        for option, mode in (("zero", "zero"), ("task", "aux")):
            rows = ModalityValuation(unimodal=option)._value_batch(task, batch)  # (B, 4): index, av, a, v
            assert rows[:, 2:].T.tolist() == expected[mode], option
    with pytest.raises(ValueError, match="unimodal"):
        ModalityValuation(unimodal="aux")


def test_ogm_and_opm_scores_follow_the_task_mode():
    """``unimodal_score_sums`` (the OGM / OPM statistic) reads the auxiliary heads in ``aux`` mode."""
    from avmoe.callbacks.ogm import unimodal_score_sums  # noqa: PLC0415

    task, batch = build("ave")
    with torch.no_grad():
        feats = task.encode(batch)
        sums = unimodal_score_sums(None, task, feats, batch)
        task.eval()
        for mode in ("aux", "zero"):
            uni = task.unimodal_outputs(feats, batch, mode)
            expected = [task.sample_scores(uni[m], batch).double().sum().item() for m in ("audio", "visual")]
            assert (sums[:2].tolist() == pytest.approx(expected)) == (mode == "aux")


@pytest.mark.parametrize("mode", ["zero", "aux"])
@pytest.mark.parametrize("name", CASES)
def test_training_loss_reaches_every_trainable_parameter(name, mode):
    """Plain DDP (find_unused_parameters=False) needs every trainable parameter in each step's graph, the
    auxiliary heads included."""
    task, batch = build(name, UnimodalConfig(mode=mode))
    task.train()
    with pytest.warns(UserWarning, match="self.trainer"):  # logging without a Trainer: Lightning warns only
        loss = task.training_step(batch, 0)
    loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


@pytest.mark.parametrize("config", ["demo.yaml", "demo_avvp.yaml", "demo_avs.yaml", "demo_avqa.yaml"])
def test_cli_defaults_to_zero_and_the_preset_switches_to_aux(config):
    zero = avs._print_config(CONFIGS / config)["model"]["init_args"]["unimodal"]
    aux = avs._print_config(CONFIGS / config, CONFIGS / "model" / "unimodal_aux.yaml")["model"]["init_args"]["unimodal"]
    assert zero == {"mode": "zero", "aux_weight": 1.0, "detach": False, "eval_correctness": True}
    assert aux == {**zero, "mode": "aux"}


@pytest.mark.parametrize("mode", ["zero", "aux"])
def test_eval_logs_each_modality_alone_counting_every_sample_once(mode):
    from avmoe.datamodules.batch import INDEX  # noqa: PLC0415

    task, batch = build("ave", UnimodalConfig(mode=mode))
    task.eval()
    with torch.no_grad():
        feats = task.encode(batch)
        uni = task.unimodal_outputs(feats, batch)
        expected = [task.sample_correct(uni[m], batch).mean().item() for m in ("audio", "visual")]
        metric = task.metrics["val_unimodal"]
        with pytest.warns(UserWarning, match="self.trainer"):
            task._eval_step(batch, "val")
        padded = {k: (v[:1] if torch.is_tensor(v) and v.shape[:1] == batch[INDEX].shape else v) for k, v in batch.items()}
        with pytest.warns(UserWarning, match="self.trainer"):
            task._eval_step(padded, "val")  # sample 0 again, as a DistributedSampler pads
        values = metric.compute()
    assert [values["unimodal_audio"].item(), values["unimodal_visual"].item()] == pytest.approx(expected)
    assert "val_unimodal" not in build("ave", UnimodalConfig(eval_correctness=False))[0].metrics
