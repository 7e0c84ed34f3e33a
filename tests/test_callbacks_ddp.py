"""The balancing callbacks under 2-process CPU DDP (gloo): the replicas must stay bit-identical.

DDP averages gradients during backward and never re-broadcasts parameters, so a callback that edits gradients
with rank-local statistics or rank-local noise makes the replicas drift apart silently. Each run here turns on
OGM-GE (with noise), OPM and valuation re-sampling and writes per-rank parameter digests (``ParameterChecksum``)
after every optimizer step; the digests (and the valuation plan digests) must agree. A negative control with
rank-local OGM statistics shows that the check does catch a divergence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from avmoe.callbacks import OGMGE, OPM, ModalityValuation, ParameterChecksum
from tests.helpers import CONFIGS, REPO, tiny_fit_args
from tests.test_callbacks import imbalanced_release, make_datamodule, make_task  # noqa: F401  (fixture)


class RankLocalOGM(OGMGE):
    """The bug the all-reduce prevents: coefficients from this rank's own scores only."""

    @staticmethod
    def _all_reduce(stats: torch.Tensor) -> torch.Tensor:
        return stats.clone()


def _digests(folder: Path) -> tuple[dict, dict]:
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    return ranks[0]["steps"], ranks[1]["steps"]


def _spawn_fit(release: Path, root: Path, ogm: OGMGE, all_callbacks: bool = True, epochs: int = 2) -> L.Trainer:
    others = [OPM(p_exe=1.0, warmup_epochs=0), ModalityValuation(warmup_epochs=1)] if all_callbacks else []
    callbacks = [ogm, *others, ParameterChecksum(dirpath=str(root / "sums"), every_n_steps=1)]
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(make_task(), make_datamodule(release, batch_size=2))
    return trainer


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_spawn_replicas_stay_identical(imbalanced_release, tmp_path):
    trainer = _spawn_fit(imbalanced_release, tmp_path, OGMGE(alpha=1.0, noise=True))
    rank0, rank1 = _digests(tmp_path / "sums")
    assert len(rank0) >= 4 and rank0 == rank1, "replicas diverged (see the first differing step)"
    assert "train_plan_sha256" in rank0[max(rank0, key=int)], "valuation re-sampled the train set"
    metrics = trainer.callback_metrics  # rank 0's, sent back by the spawn launcher
    assert {"ogm/k_audio", "ogm/k_visual", "opm/q_audio", "opm/executed"} <= set(metrics)
    assert metrics["valuation/plan_size"] > 8


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_spawn_rank_local_statistics_diverge(imbalanced_release, tmp_path):
    """Negative control: the same run with rank-local OGM statistics does NOT keep the replicas identical."""
    _spawn_fit(imbalanced_release, tmp_path, RankLocalOGM(alpha=3.0, noise=False), all_callbacks=False, epochs=1)
    rank0, rank1 = _digests(tmp_path / "sums")
    assert rank0 != rank1


def _preset(name: str, folder: Path, **init_args: object) -> Path:
    """A copy of a shipped preset with some init_args changed (short runs need short warm-ups)."""
    config = yaml.safe_load((CONFIGS / "callbacks" / f"{name}.yaml").read_text())
    config["trainer"]["callbacks+"][0]["init_args"].update(init_args)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.ddp
def test_cli_ddp_replicas_stay_identical(imbalanced_release, tmp_path):
    """``python -m avmoe fit`` with the presets appended and ``--trainer.strategy=ddp --trainer.devices=2``.

    This run takes the uni-modal predictions from auxiliary heads (``model/unimodal_aux.yaml``; valuation with
    ``unimodal: task``): their parameters join DDP's gradient all-reduce; the spawn run above covers zeroing."""
    runs = tmp_path / "runs"
    extra = tmp_path / "checksum.yaml"
    extra.write_text("trainer:\n  callbacks+:\n    - class_path: avmoe.callbacks.ParameterChecksum\n"
                     "      init_args: {every_n_steps: 1}\n")
    presets = [CONFIGS / "model" / "unimodal_aux.yaml", CONFIGS / "callbacks" / "ogm_ge.yaml",
               _preset("opm", tmp_path, warmup_epochs=0, p_exe=1.0),
               _preset("valuation", tmp_path, warmup_epochs=1, unimodal="task"), extra]
    args = tiny_fit_args(imbalanced_release, runs, name="ddp", epochs=2)
    for preset in presets:
        args += ["--config", str(preset)]
    args += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
             "--data.init_args.batch_size=2", "--trainer.log_every_n_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "avmoe", "fit", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    folder = runs / "ddp"
    rank0, rank1 = _digests(folder / "checksums")
    assert len(rank0) >= 4 and rank0 == rank1, "replicas diverged (see the first differing step)"
    assert "train_plan_sha256" in rank0[max(rank0, key=int)]
    assert (folder / "valuation" / "epoch_000.npz").is_file() and (folder / "valuation" / "epoch_001.npz").is_file()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["init_args"]["unimodal"]["mode"] == "aux"
    assert "unimodal_heads.audio.cls.linear.weight" in torch.load(folder / "checkpoints" / "last.ckpt",
                                                                   weights_only=True)["state_dict"]
    names = [c["class_path"] for c in config["trainer"]["callbacks"] if c["class_path"].startswith("avmoe.")]
    assert names == ["avmoe.callbacks.OGMGE", "avmoe.callbacks.OPM", "avmoe.callbacks.ModalityValuation",
                     "avmoe.callbacks.ParameterChecksum"]
