"""Joint multitask training: task sampling, resumable task sampler, the composed module, DDP and init_from."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torch.utils.data import Dataset

from avmoe.datamodules import AVEDataModule, LLPDataModule, LogMelConfig, MultitaskDataModule, task_probabilities
from avmoe.datamodules.multitask import TaskSampler, draw_tasks
from avmoe.callbacks._distributed import parameter_digest
from avmoe.datamodules.sampling import EpochSampler, ResumableDataLoader
from avmoe.models.presets import tiny_config
from avmoe.models.task_routing import TaskRouters
from avmoe.tasks import AVETask, MultitaskModule
from avmoe.tasks.base import plain
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

AVE_HEAD = {"visual_dim": 32, "audio_dim": 16, "d_model": 32, "num_heads": 2, "ff_dim": 64, "num_layers": 1,
            "topk": 2}
AVVP_HEAD = {"arch": "mmil", "dim": 32, "num_heads": 1}
TASKS = {"ave": {"class_path": "avmoe.tasks.AVETask", "init_args": {"head": AVE_HEAD}},
         "avvp": {"class_path": "avmoe.tasks.AVVPTask", "init_args": {"head": AVVP_HEAD}}}


# ---- task probabilities and draws -----------------------------------------------------------------------------
def test_task_probabilities_by_rule():
    sizes = {"a": 100, "b": 25, "c": 1}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"a": 100 / 126, "b": 25 / 126, "c": 1 / 126})
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx({"a": 10 / 16, "b": 5 / 16, "c": 1 / 16})
    assert task_probabilities(sizes, "round_robin") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # large T tends to uniform
    far = task_probabilities(sizes, "temperature", 1e6)
    assert max(far.values()) - min(far.values()) < 1e-4


def test_max_passes_caps_the_small_task_and_gives_its_share_to_the_others():
    # 100 steps of batch 1; c has 2 samples: uncapped (uniform) it would make 100/3/2 = 16.7 passes
    sizes, bs = {"a": 600, "b": 300, "c": 2}, {"a": 1, "b": 1, "c": 1}
    p = task_probabilities(sizes, "temperature", 1e9, max_passes=4, steps=100, batch_sizes=bs)
    assert p["c"] == pytest.approx(4 * 2 / 100)  # exactly at its cap
    assert p["a"] == pytest.approx(p["b"]) and sum(p.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot fill"):
        task_probabilities({"a": 2, "b": 2}, "proportional", max_passes=1, steps=100, batch_sizes={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="non-empty"):
        task_probabilities({"a": 0}, "proportional")


def test_draws_depend_on_seed_and_epoch_only():
    probs = {"a": 0.5, "b": 0.3, "c": 0.2}
    first = draw_tasks(list(probs), probs, 200, seed=3, epoch=1)
    assert first == draw_tasks(list(probs), probs, 200, seed=3, epoch=1)
    assert first != draw_tasks(list(probs), probs, 200, seed=3, epoch=2)
    counts = {t: first.count(t) / 200 for t in probs}
    assert counts == pytest.approx(probs, abs=0.1)
    assert draw_tasks(["a", "b"], probs, 5, 0, 1, round_robin=True) == ["b", "a", "b", "a", "b"]


# ---- the resumable sampler --------------------------------------------------------------------------------------
class _Items(Dataset):
    def __init__(self, n: int, tag: int) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, index = key
        return torch.tensor([self.tag, index])


class _TaggedItems(_Items):
    def __getitem__(self, key):
        return {"x": super().__getitem__(key)}


def test_sampler_resumes_mid_epoch_exactly_and_loaders_continue_their_passes():
    def make(epoch):
        loaders = {}
        for tag, (name, n) in enumerate((("a", 7), ("b", 3))):
            ds = _TaggedItems(n, tag)
            loaders[name] = ResumableDataLoader(ds, batch_size=2, sampler=EpochSampler(ds, seed=5))
        return TaskSampler(loaders, {"a": 0.6, "b": 0.4}, steps=9, seed=11, epoch_fn=lambda: epoch[0])

    def run(sampler, epoch, epochs, stop_after=-1):
        seen = []
        for e in epochs:
            epoch[0] = e
            for batch in sampler:
                seen.append((batch["task"], batch["x"].tolist()))
                if len(seen) == stop_after:
                    return seen
        return seen

    e_ref = [0]
    reference = run(make(e_ref), e_ref, range(3))
    assert len(reference) == 27 and {t for t, _ in reference} == {"a", "b"}
    # task b (3 samples, batch 2) is drawn more often than it has batches: its loader starts new passes
    b_items = [i for t, x in reference if t == "b" for _, i in x]
    assert len(b_items) > 3 and sorted(set(b_items)) == [0, 1, 2]
    for cut in (4, 13):  # mid-epoch 0 and mid-epoch 1
        e1 = [0]
        first = make(e1)
        head = run(first, e1, range(3), stop_after=cut)
        state = copy.deepcopy(first.state_dict())
        e2 = [e1[0]]
        resumed = make(e2)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state, "a restored sampler saved before it runs keeps the position"
        tail = run(resumed, e2, range(e1[0], 3))
        assert head + tail == reference, f"resume after {cut} steps differs"


# ---- the composed module ----------------------------------------------------------------------------------------
def _module(**kwargs) -> MultitaskModule:
    return MultitaskModule(tasks=copy.deepcopy(TASKS), backbone=tiny_config(), **kwargs)


def test_members_share_one_backbone_saved_once():
    model = _module(task_routers=True, loss_weighting="uncertainty")
    assert model.tasks["ave"].backbone is model.backbone is model.tasks["avvp"].backbone
    keys = list(model.state_dict())
    assert not any(k.startswith("tasks.ave.backbone.") for k in keys)
    assert any(k.startswith("tasks.ave.head.") for k in keys) and any(k.startswith("tasks.avvp.head.") for k in keys)
    routers = [m for m in model.backbone.modules() if isinstance(m, TaskRouters)]
    assert routers and all(list(r.routers) == ["ave", "avvp"] for r in routers)
    with pytest.raises(ValueError, match="backbone is shared"):
        MultitaskModule(tasks={"ave": {"class_path": "avmoe.tasks.AVETask", "init_args": {"backbone": {}}}},
                        backbone=tiny_config())
    with pytest.raises(ValueError, match="not a single-task AVTask"):
        MultitaskModule(tasks={"x": {"class_path": "avmoe.tasks.MultitaskModule"}}, backbone=tiny_config())


def _datamodule(ave_release, llp_release, **kwargs) -> MultitaskDataModule:
    common = {"batch_size": 2, "num_workers": 0, "image_size": 64, "audio": LogMelConfig(n_mels=32),
              "limit_samples": 6}
    return MultitaskDataModule({"ave": AVEDataModule(str(ave_release), **common),
                                "avvp": LLPDataModule(str(llp_release), **common)}, **kwargs)


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_undrawn_head_and_router_stay_exactly_unchanged(ave_release, llp_release, tmp_path):
    torch.manual_seed(0)
    model = _module(task_routers=True, loss_weighting="uncertainty")
    before = _params(model)
    # round robin starting at task 0 in epoch 0: 1 step = AVE only
    dm = _datamodule(ave_release, llp_release, sampling="round_robin", steps_per_epoch=1)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    after = _params(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("tasks.ave.head.") for k in changed)
    assert "log_vars.ave" in changed
    untouched = [k for k in before if k.startswith("tasks.avvp.") or ".routers.avvp." in k or k == "log_vars.avvp"]
    assert untouched and not (set(untouched) & changed)
    # Adam has no state for them: a later step cannot move them with stale moments either
    opt = trainer.optimizers[0]
    named = dict(model.named_parameters())
    assert all(named[k] not in opt.state for k in untouched)
    assert any(named[k] in opt.state for k in changed)
    # the drawn task's routers took part (zero-init gates give them a zero first gradient, but a gradient)
    assert all(named[k] in opt.state for k in named if ".routers.ave." in k)


@pytest.mark.slow
def test_fit_validates_per_task_and_init_from_both_ways(ave_release, llp_release, tmp_path):
    from avmoe.cli import init_weights

    torch.manual_seed(0)
    model = _module()
    dm = _datamodule(ave_release, llp_release, sampling="temperature", steps_per_epoch=4)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("val/ave/acc", "val/avvp/segment_type", "val/score", "val/ave/loss", "val/avvp/loss"):
        assert key in metrics, key
    expected = (float(metrics["val/ave/acc"]) + float(metrics["val/avvp/segment_type"])) / 2
    assert float(metrics["val/score"]) == pytest.approx(expected)
    ckpt = tmp_path / "mt.ckpt"
    trainer.save_checkpoint(ckpt)

    # multitask -> single task: backbone + that head, equal outputs on the same batch
    single = AVETask(backbone=tiny_config(), head=AVE_HEAD)
    init_weights(single, str(ckpt), strict=True)
    batch = next(iter(dm.tasks["ave"].val_dataloader()))
    model.eval(), single.eval()
    with torch.no_grad():
        batch["task"] = "ave"
        _, mt_out = model(batch)
        _, st_out = single(batch)
    assert torch.equal(mt_out["event_scores"], st_out["event_scores"])

    # single task -> multitask: that member gets backbone + head, the other member keeps its initialisation
    single_ckpt = tmp_path / "single.ckpt"
    torch.save({"state_dict": single.state_dict(), "hyper_parameters": plain(dict(single.hparams))}, single_ckpt)
    fresh = _module()
    avvp_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("tasks.avvp.")}
    init_weights(fresh, str(single_ckpt), strict=True)
    state = fresh.state_dict()
    for key, value in single.state_dict().items():
        target = key if key.startswith("backbone.") else f"tasks.ave.{key}"
        assert torch.equal(state[target], value), target
    assert all(torch.equal(state[k], v) for k, v in avvp_before.items())


def test_unknown_weights_and_bad_member_specs_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        _module(loss_weights={"avqa": 2.0})
    with pytest.raises(ValueError, match="class_path"):
        MultitaskModule(tasks={"ave": {"head": {}}}, backbone=tiny_config())
    assert math.isclose(_module(loss_weights={"ave": 2.0}).weighted("ave", torch.tensor(1.5)).item(), 3.0)
    s = _module(loss_weighting="uncertainty")
    with torch.no_grad():
        s.log_vars["ave"].fill_(math.log(4.0))
    assert s.weighted("ave", torch.tensor(2.0)).item() == pytest.approx(2.0 / 4 + 0.5 * math.log(4.0))


# ---- 2-process DDP through the real CLI ---------------------------------------------------------------------------
class MemberDigests(Callback):
    """Writes ``<root>/members_rank<r>.json``: each member's parameter digest at fit start and end."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: parameter_digest(t)["sha256"] for n, t in pl_module.tasks.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        end = {n: parameter_digest(t)["sha256"] for n, t in pl_module.tasks.items()}
        path = Path(trainer.default_root_dir) / f"members_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"start": self.start, "end": end, "steps": trainer.global_step}))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_processes_replicas_identical_and_undrawn_member_unchanged(ave_release, llp_release, in_tmp):
    common = {"batch_size": 2, "num_workers": 0, "image_size": 64, "audio": {"n_mels": 32}, "limit_samples": 6}
    ave = {"class_path": "avmoe.datamodules.AVEDataModule", "init_args": {"root": str(ave_release), **common}}
    llp = {"class_path": "avmoe.datamodules.LLPDataModule", "init_args": {"root": str(llp_release), **common}}
    config = {
        "seed_everything": 0,
        "run": {"name": "mt_ddp", "test_after_fit": False},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp_find_unused_parameters_true",
                    "max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, "logger": False,
                    "callbacks": [{"class_path": "avmoe.callbacks.ParameterChecksum"},
                                  {"class_path": "tests.test_multitask.MemberDigests"}]},
        "model": {"class_path": "avmoe.tasks.MultitaskModule", "init_args": {
            "backbone": plain(tiny_config()), "task_routers": True, "loss_weighting": "uncertainty",
            # two AVE members on the same data: round robin over 3 tasks in 2 steps never draws "ave2"
            "tasks": {"ave": TASKS["ave"], "avvp": TASKS["avvp"], "ave2": TASKS["ave"]}}},
        "data": {"class_path": "avmoe.datamodules.MultitaskDataModule", "init_args": {
            "sampling": "round_robin", "steps_per_epoch": 2, "tasks": {"ave": ave, "avvp": llp, "ave2": ave}}},
    }
    cfg = in_tmp / "mt_ddp.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "avmoe", "fit", "--config", str(cfg)], env=env, cwd=in_tmp,
                          timeout=400, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    folder = in_tmp / "runs" / "mt_ddp"
    sums = [json.loads((folder / "checksums" / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
    assert sums[0] == sums[1], "DDP replicas differ"
    members = [json.loads((folder / f"members_rank{r}.json").read_text()) for r in (0, 1)]
    assert members[0] == members[1] and members[0]["steps"] == 2
    start, end = members[0]["start"], members[0]["end"]
    assert start["ave"] != end["ave"] and start["avvp"] != end["avvp"]
    assert start["ave2"] == end["ave2"], "a member no rank drew must stay exactly as initialised"


def test_balancing_callbacks_on_the_multitask_module(ave_release, llp_release, tmp_path):
    """OGM-GE acts through the member of each step's batch; valuation, D&R and MMPareto refuse at fit start
    (the first two read one AVDataModule's train set, MMPareto's per-loss gradients assume one task's terms)."""
    from avmoe.callbacks import OGMGE, MMPareto, ModalityValuation, Relearning

    torch.manual_seed(0)
    model = _module()
    dm = _datamodule(ave_release, llp_release, sampling="round_robin", steps_per_epoch=2)
    ogm = OGMGE()
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[ogm])
    trainer.fit(model, datamodule=dm)
    logged = {k for k in trainer.callback_metrics if k.startswith(ogm.prefix)}
    assert logged, "OGM-GE logged no statistic on the multitask module"
    for callback, error, match in ((ModalityValuation(), TypeError, "needs an AVDataModule"),
                                   (Relearning(), TypeError, "needs an AVDataModule"),
                                   (MMPareto(), ValueError, "not supported on a multitask")):
        with pytest.raises(error, match=match):
            Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
                    callbacks=[callback]).fit(_module(), datamodule=_datamodule(ave_release, llp_release))


def test_figures_timelines_segments_and_embeddings(ave_release, llp_release, tmp_path):
    """The AVVP timeline, AVE segment and embedding callbacks on the multitask module: TensorBoard images and
    projector data at validation/test, PNGs in the run folder at test."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from avmoe.callbacks import AVESegments, AVVPTimelines, FeatureEmbeddings

    torch.manual_seed(0)
    model = _module()
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    trainer = Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, default_root_dir=tmp_path,
                      callbacks=[AVVPTimelines(num_videos=2), AVESegments(num_videos=2), FeatureEmbeddings()])
    dm = _datamodule(ave_release, llp_release)
    trainer.validate(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["images"])
    assert {"figures/avvp_timeline/0", "figures/avvp_timeline/1", "figures/ave_segments/0"} <= tags, tags
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == ["figures_ave_segments_0.png", "figures_ave_segments_1.png", "figures_avvp_timeline_0.png",
                    "figures_avvp_timeline_1.png"]
    projector = (tmp_path / "projector_config.pbtxt").read_text()
    assert "embeddings/audio" in projector and "embeddings/visual" in projector
    found = sorted(tmp_path.rglob("metadata.tsv"))
    assert len(found) == 2, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    labels = found[0].read_text().splitlines()
    assert labels and all(line.split(":")[0] in ("ave", "avvp") for line in labels)


# ---- exact mid-epoch resume through the CLI --------------------------------------------------------------------
def _mt_config(ave_release, llp_release, folder: Path) -> Path:
    common = {"batch_size": 2, "num_workers": 0, "image_size": 64, "audio": {"n_mels": 32}, "limit_samples": 5}
    config = {
        "seed_everything": 0,
        "run": {"test_after_fit": False, "step_seeding": True},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "num_sanity_val_steps": 0,
                    "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1},
        "model": {"class_path": "avmoe.tasks.MultitaskModule", "init_args": {
            "backbone": plain(tiny_config()), "loss_weighting": "uncertainty", "tasks": copy.deepcopy(TASKS)}},
        "data": {"class_path": "avmoe.datamodules.MultitaskDataModule", "init_args": {
            "sampling": "temperature", "steps_per_epoch": 2, "tasks": {
                "ave": {"class_path": "avmoe.datamodules.AVEDataModule",
                        "init_args": {"root": str(ave_release), **common}},
                "avvp": {"class_path": "avmoe.datamodules.LLPDataModule",
                         "init_args": {"root": str(llp_release), **common}}}}},
    }
    path = folder / "mt.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_mid_epoch_sigterm_resumes_the_task_sampler_bit_for_bit(ave_release, llp_release, in_tmp):
    from avmoe.cli import SIGTERM_EXIT_CODE
    from tests.test_resume import assert_identical, load, run_cli

    cfg = str(_mt_config(ave_release, llp_release, in_tmp))
    runs = in_tmp / "runs"
    assert run_cli(["fit", "--config", cfg, f"--run.root={runs}", "--run.name=ref"]) == 0
    want = runs / "ref" / "checkpoints" / "last.ckpt"
    assert load(want)["global_step"] == 4
    cut = ["fit", "--config", cfg, f"--run.root={runs}", "--run.name=cut"]
    signal = ["--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=3"]
    assert run_cli([*cut, *signal]) == SIGTERM_EXIT_CODE
    state = load(runs / "cut" / "checkpoints" / "on_exception.ckpt")
    sampler = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["global_step"], sampler["epoch"], sampler["step"]) == (3, 1, 1), "mid-epoch 1, after 1 step"
    assert run_cli([*cut, "--ckpt_path=last"]) == 0
    assert_identical(runs / "cut" / "checkpoints" / "last.ckpt", want)


def test_router_usage_is_split_by_task(ave_release, llp_release, tmp_path):
    from avmoe.callbacks import AVESegments, RouterUsage

    torch.manual_seed(0)
    model = _module(task_routers=True)
    dm = _datamodule(ave_release, llp_release, sampling="round_robin", steps_per_epoch=2)
    usage = RouterUsage(str(tmp_path / "router_usage"))
    # The figure's eval-mode pass over a fixed validation batch after validation runs inside the training epoch:
    # it must not be counted as training usage.
    figures = AVESegments(num_videos=2)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[usage, figures],
                      limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    files = sorted(p.name for p in (tmp_path / "router_usage").glob("*.json"))
    assert files == ["train_ave.json", "train_avvp.json", "val_ave.json", "val_avvp.json"]
    frames = {t: json.loads((tmp_path / "router_usage" / f"train_{t}.json").read_text())["epochs"][-1]["frames"]
              for t in ("ave", "avvp")}
    assert frames == {"ave": 2 * 10, "avvp": 2 * 10}, "one training step of 2 clips x 10 segments per task"
    per_task = {t: json.loads((tmp_path / "router_usage" / f"val_{t}.json").read_text())["epochs"][-1]["weight"]
                for t in ("ave", "avvp")}
    for weights in per_task.values():
        assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in weights)  # router distributions
    assert per_task["ave"] != per_task["avvp"], "different inputs (and routers) route differently"
    assert "router/ave/" in " ".join(trainer.callback_metrics) or any(
        k.startswith("val_router/ave/") for k in trainer.callback_metrics)
