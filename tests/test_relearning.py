"""Diagnosing & Re-learning: plain functions against a transcription of the authors' code, and a real fit.

Transcribed (tests only) from ``GeWu-Lab/Diagnosing_Relearning_ECCV2024`` 025085e ``code/ours.py``:
``purity_score``, the per-feature part of ``reinit_score`` and the update of ``reinit``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from sklearn import preprocessing
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score

from avmoe.callbacks import Relearning, kmeans_purity, relearning_strength, soft_reinit_
from avmoe.callbacks.relearning import cluster_labels, purity
from tests.test_callbacks import imbalanced_release, make_datamodule, make_task, make_trainer  # noqa: F401


def official_purity_score(y_true, y_pred):
    y_voted_labels = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    ordered_labels = np.arange(labels.shape[0])
    for k in range(labels.shape[0]):
        y_true[y_true == labels[k]] = ordered_labels[k]
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        winner = np.argmax(hist)
        y_voted_labels[y_pred == cluster] = winner
    return accuracy_score(y_true, y_voted_labels)


def official_feature_purity(fea, label, n_classes):
    scaler = preprocessing.MinMaxScaler(feature_range=(-1, 1))
    result = scaler.fit_transform(fea)
    y_pred = KMeans(n_clusters=n_classes, random_state=0).fit_predict(result)
    return official_purity_score(np.array(label), y_pred)


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_kmeans_purity_matches_the_official_pipeline(spread):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60) * 3 + 5  # non-contiguous labels (the official code re-maps them)
    centres = rng.normal(size=(20, 16)).astype(np.float32)
    feats = (centres[labels] + spread * rng.normal(size=(60, 16))).astype(np.float32)
    expected = official_feature_purity(feats.copy(), labels.copy(), 4)
    got = kmeans_purity(torch.from_numpy(feats), torch.from_numpy(labels), num_clusters=4, seed=0)
    assert got == pytest.approx(expected, abs=1e-12)
    assert (got > 0.9) == (spread < 1), "well separated classes are pure"
    clusters = rng.integers(0, 5, 60)
    assert purity(labels, clusters) == pytest.approx(official_purity_score(labels.copy(), clusters))


def test_strength_and_soft_reinit_match_the_official_update():
    for p_train, p_val, lam in ((0.9, 0.4, 3.0), (0.4, 0.9, 3.0), (0.5, 0.5, 3.0), (0.71, 0.7, 1.0)):
        official = torch.tanh(torch.tensor(lam * np.abs(p_train - p_val)))  # float64, as reinit_score
        assert relearning_strength(p_train, p_val, lam) == pytest.approx(float(official), abs=1e-15)
    gen = torch.Generator().manual_seed(0)
    init, current = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    weight = torch.tanh(torch.tensor(3.0 * np.abs(0.9 - 0.55)))
    official = weight * init + (1 - weight) * current  # reinit: new_weight, then param.data = new_weight
    out = current.clone()
    assert soft_reinit_(out, init, float(weight)) is out
    assert torch.equal(out, official), "same values as the official update, bit for bit"
    assert torch.equal(soft_reinit_(current.clone(), init, 0.0), current)


def test_cluster_labels_per_task():
    ave = {"label": torch.tensor([[28, 3, 3, 28], [28] * 4])}
    assert cluster_labels(None, ave).tolist() == [3, 28]
    assert cluster_labels(None, {"labels": torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])}).tolist() == [1, 0]
    assert cluster_labels(None, {"answer": torch.tensor([4, 2])}).tolist() == [4, 2]
    cats = cluster_labels(None, {"category": ["dog", "cat", "dog"]}).tolist()
    assert cats[0] == cats[2] != cats[1]
    with pytest.raises(ValueError, match="class labels"):
        cluster_labels(None, {"category": ["", ""]})


class BeforeEpochEnd(Callback):
    """Copies the modality parameters at ``on_train_epoch_end`` (placed before Relearning: pre-reinit values)."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, list[torch.Tensor]]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.params[trainer.current_epoch] = {m: [p.detach().clone() for p in ps]
                                              for m, ps in pl_module.modality_parameters().items()}


@pytest.mark.slow
def test_fit_reinitialises_toward_the_snapshot(imbalanced_release, tmp_path):
    task = make_task()
    initial = {m: [p.detach().clone() for p in ps] for m, ps in task.modality_parameters().items()}
    spy, relearn = BeforeEpochEnd(), Relearning(every_n_epochs=1, max_times=1, lam=3.0, optimizer_state="reset")
    trainer = make_trainer(tmp_path, [spy, relearn], max_epochs=2, limit_val_batches=1)
    trainer.fit(task, make_datamodule(imbalanced_release, batch_size=4))
    assert relearn.done_epochs == [1] and len(relearn.history) == 1, "epoch 0 is never diagnosed (epoch > 0)"
    record = relearn.history[0]
    for m in ("audio", "visual"):
        alpha = record[f"alpha_{m}"]
        assert alpha == pytest.approx(relearning_strength(record[f"purity_train_{m}"], record[f"purity_val_{m}"], 3.0))
        for p, before, init in zip(task.modality_parameters()[m], spy.params[1][m], initial[m]):
            torch.testing.assert_close(p.detach(), alpha * init + (1 - alpha) * before)
            assert p not in trainer.optimizers[0].state, "optimizer_state: reset drops the moments"
    assert any(record[f"alpha_{m}"] > 0 for m in ("audio", "visual")), "the diagnosis moved at least one modality"
    assert trainer.callback_metrics["relearning/count"] == 1.0
    with pytest.raises(ValueError, match="optimizer_state"):
        Relearning(optimizer_state="zero")
    assert math.isfinite(record["purity_train_audio"])
