"""AVTask is really abstract, and every task module owns its config objects (no instance shared via defaults)."""

from __future__ import annotations

import warnings

import pytest
from torch import Tensor

from avmoe.metrics.unimodal import UnimodalCorrectness
from avmoe.models.heads.ave import AVEHeadConfig
from avmoe.models.presets import tiny_config
from avmoe.tasks.ave import AVETask
from avmoe.tasks.base import AVTask, OptimConfig

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_HEAD = AVEHeadConfig(visual_dim=32, audio_dim=16, d_model=32, num_heads=2, ff_dim=64, num_layers=1, topk=2)
ABSTRACT = ("head_forward", "compute_losses", "make_metric", "update_metric", "sample_scores")


class Complete(AVTask):
    def head_forward(self, feats, batch):
        return {}

    def compute_losses(self, outputs, batch) -> dict[str, Tensor]:
        return {}

    def make_metric(self):
        return UnimodalCorrectness()

    def update_metric(self, metric, outputs, batch) -> None:
        pass

    def sample_scores(self, outputs, batch) -> Tensor:
        raise NotImplementedError


class MissingScores(AVTask):  # every abstract method but sample_scores
    head_forward = Complete.head_forward
    compute_losses = Complete.compute_losses
    make_metric = Complete.make_metric
    update_metric = Complete.update_metric


def test_abstract_methods_are_enforced() -> None:
    assert set(AVTask.__abstractmethods__) == set(ABSTRACT)
    with pytest.raises(TypeError, match="abstract"):
        AVTask(backbone=tiny_config(), optim=OptimConfig())
    with pytest.raises(TypeError, match="sample_scores"):
        MissingScores(backbone=tiny_config(), optim=OptimConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings of the tiny encoders
        assert isinstance(Complete(backbone=tiny_config(), optim=OptimConfig()), AVTask)


def test_default_configs_are_not_shared() -> None:
    backbone = tiny_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = AVETask(backbone=backbone, head=TINY_HEAD), AVETask(backbone=backbone, head=TINY_HEAD)
    for name in ("optim", "unimodal", "head_config", "backbone_config"):
        assert getattr(a, name) is not getattr(b, name), name
        assert getattr(a, name) == getattr(b, name), name
    assert a.backbone_config is not backbone and a.head_config is not TINY_HEAD
    a.optim.lr = 123.0  # mutating one module's config touches neither the other nor the signature default
    assert b.optim.lr == OptimConfig().lr == 5e-4
    default = AVETask.__init__.__defaults__[2]  # the OptimConfig() evaluated once with the signature
    assert isinstance(default, OptimConfig) and default.lr == 5e-4
