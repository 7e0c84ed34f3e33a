"""AVQA head and task: parity of the head's pieces with the official code, losses and gradients, vocabularies
through setup and checkpoints, the text-model question encoder, and a short fit + test + predict through the CLI."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avmoe.cli import cli_main
from avmoe.metrics.avqa import QUESTION_TYPES, group_key, type_key
from avmoe.models.heads.avqa import AVQAHead, AVQAHeadConfig, QuestionLSTM
from avmoe.models.presets import paper_adapter, tiny_config
from avmoe.tasks.avqa import VOCAB_KEY, AVQATask
from avmoe.tasks.base import OptimConfig
from tests.helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["two", "yes", "no", "left", "violin"]
WORDS = ["<pad>", "How", "many", "Is", "the", "violin", "Where"]
TINY_HEAD = AVQAHeadConfig(word_dim=16, match_hidden=[32, 16, 8])


def tiny_backbone():
    return tiny_config(adapter=dict(vars(paper_adapter("avqa")), router_hidden=[16, 8]))


@pytest.fixture(scope="module")
def task() -> AVQATask:
    torch.manual_seed(0)
    return AVQATask(backbone=tiny_backbone(), head=TINY_HEAD, optim=OptimConfig(lr=1e-3),
                    answer_vocab=ANSWERS, question_vocab=WORDS)


def tiny_batch(task: AVQATask, b: int = 2, t: int = 3, negatives: bool = True) -> dict:
    cfg = task.backbone_config
    size, mels = cfg.visual.image_size, cfg.audio.num_mel_bins
    g = torch.Generator().manual_seed(1)
    batch = {
        "video": torch.randint(0, 255, (b, t, 3, size, size), dtype=torch.uint8, generator=g),
        "audio": torch.randn(b, t, 101, mels, generator=g),
        "question": torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0]])[:b],
        "answer": torch.tensor([0, 4])[:b], "qtype": torch.tensor([0, 8])[:b],
        "question_id": torch.tensor([11, 12])[:b], "video_id": ["00000001", "va00000002"][:b],
        "question_text": ["How many", "Is the violin"][:b],
        "audio_mask": torch.ones(b), "visual_mask": torch.ones(b), "index": torch.arange(b),
    }
    if negatives:
        batch["negative_video"] = torch.randint(0, 255, (b, t, 3, size, size), dtype=torch.uint8, generator=g)
    return batch


# ------------------------------------------------------------------------------------------- head vs official code


def official_grounding(head: AVQAHead, tokens: torch.Tensor, audio_proj: torch.Tensor) -> torch.Tensor:
    """ST-AVQA / LAVisH ``forward`` grounding on (B*T, C, H, W) maps, written as the official code does it."""
    b, t, n, c = tokens.shape
    temp_visual = tokens.reshape(b * t, n, c).permute(0, 2, 1).reshape(b * t, c, n, 1)  # [B*T, C, H, W]
    v_feat = nn.AdaptiveAvgPool2d((1, 1))(temp_visual)
    before = v_feat.squeeze()
    v_feat = temp_visual.view(b * t, c, n).permute(0, 2, 1)
    visual_feat_posi = F.normalize(v_feat, dim=2)
    audio_feat_aa = F.normalize(audio_proj.reshape(b * t, c).unsqueeze(-1), dim=1)
    x2_va = torch.matmul(visual_feat_posi, audio_feat_aa).squeeze()
    x2_p = F.softmax(x2_va, dim=-1).unsqueeze(-2)
    after = torch.matmul(x2_p, visual_feat_posi).squeeze()
    visual_gl = torch.cat((before, after), dim=-1)
    return head.grounding_fc(torch.tanh(visual_gl)).view(b, t, c)


def official_question_encoder(enc: QuestionLSTM, question: torch.Tensor) -> torch.Tensor:
    """``QstEncoder.forward`` (sequence-first LSTM)."""
    qst_vec = torch.tanh(enc.embed(question)).transpose(0, 1)
    lstm = nn.LSTM(enc.lstm.input_size, enc.lstm.hidden_size, enc.lstm.num_layers)
    lstm.load_state_dict(enc.lstm.state_dict())
    _, (hidden, cell) = lstm(qst_vec)
    qst_feature = torch.cat((hidden, cell), 2).transpose(0, 1)
    qst_feature = qst_feature.reshape(qst_feature.size()[0], -1)
    return enc.fc(torch.tanh(qst_feature))


def official_match_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``batch_organize`` + ``CrossEntropyLoss`` on (B*T, 2) positive / negative logits."""
    out_match = torch.zeros(pos.shape[0] * 2, pos.shape[1])
    labels = torch.zeros(pos.shape[0] * 2)
    for i in range(pos.shape[0]):
        out_match[i * 2, :], out_match[i * 2 + 1, :] = pos[i, :], neg[i, :]
        labels[i * 2], labels[i * 2 + 1] = 1, 0
    return nn.CrossEntropyLoss()(out_match, labels.long())


def test_head_pieces_match_the_official_code():
    torch.manual_seed(0)
    head = AVQAHead(24, 12, vocab_size=9, num_answers=5, cfg=AVQAHeadConfig(match_hidden=[16, 8, 4]))
    tokens, audio = torch.randn(2, 3, 4, 24), torch.randn(2, 3, 12)
    a = head.project_audio(audio)
    torch.testing.assert_close(head.ground(tokens, a), official_grounding(head, tokens, a))
    question = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]])
    torch.testing.assert_close(head.question_encoder(question), official_question_encoder(head.question_encoder,
                                                                                           question))
    out = head(tokens, audio, question, negative_tokens=torch.randn(2, 3, 4, 24))
    assert out["answer_logits"].shape == (2, 5) and out["match_pos"].shape == (2, 3, 2)
    batch = {"audio_mask": torch.ones(2), "visual_mask": torch.ones(2)}
    torch.testing.assert_close(AVQATask.match_loss(out, batch),
                               official_match_loss(out["match_pos"].reshape(6, 2), out["match_neg"].reshape(6, 2)))


def test_answer_classifier_size_quirk():
    assert AVQAHead(8, 8, 9, 5).classifier.out_features == 5  # vocabulary size by default
    assert AVQAHead(8, 8, 9, 5, AVQAHeadConfig(num_classes=50)).classifier.out_features == 50  # train_v2.sh
    with pytest.raises(ValueError, match="smaller than the answer vocabulary"):
        AVQAHead(8, 8, 9, 5, AVQAHeadConfig(num_classes=4))


# ------------------------------------------------------------------------------------------- task: losses, grads


def test_losses_and_gradients_reach_adapters_and_head_not_frozen_or_negatives(task):
    batch = tiny_batch(task)
    task.train()
    task.zero_grad()
    _, out = task(batch)
    assert out["answer_logits"].shape == (2, len(ANSWERS)) and out["match_neg"].shape == (2, 3, 2)
    assert not batch["negative_tokens"].requires_grad, "negatives come from the plain frozen Swin, no grad"
    losses = task.compute_losses(out, batch)
    assert set(losses) == {"loss_qa", "loss_match"}
    torch.stack(list(losses.values())).sum().backward()
    frozen = [p for p in task.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert task.head.question_encoder.embed.weight.grad.abs().sum() > 0
    assert task.head.match[0].weight.grad.abs().sum() > 0
    adapters = [p for p in task.backbone.adapters.parameters() if p.grad is not None]
    assert adapters and any(p.grad.abs().sum() > 0 for p in adapters)
    # Evaluation batches carry no negatives: answer loss only.
    task.eval()
    with torch.no_grad():
        _, out = task(tiny_batch(task, negatives=False))
    assert set(task.compute_losses(out, batch)) == {"loss_qa"}


def test_match_loss_leaves_out_samples_without_both_modalities():
    g = torch.Generator().manual_seed(0)
    out = {"match_pos": torch.randn(3, 4, 2, generator=g), "match_neg": torch.randn(3, 4, 2, generator=g)}
    masked = {"audio_mask": torch.tensor([1.0, 0.0, 1.0]), "visual_mask": torch.tensor([1.0, 1.0, 0.0])}
    only_first = {k: v[:1] for k, v in out.items()}
    torch.testing.assert_close(AVQATask.match_loss(out, masked), AVQATask.match_loss(only_first, {}))
    none = {"audio_mask": torch.zeros(3), "visual_mask": torch.ones(3)}
    assert float(AVQATask.match_loss(out, none)) == 0.0


def test_scores_metric_and_modality_contract(task):
    batch = tiny_batch(task)
    task.eval()
    with torch.no_grad():
        feats, out = task(batch)
        uni = task.unimodal_outputs(feats, batch)
    scores = task.sample_scores(out, batch)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert not torch.allclose(uni["audio"]["answer_logits"], uni["visual"]["answer_logits"])
    assert "match_pos" in out and all(set(u) == {"answer_logits"} for u in uni.values()), "no uni-modal match"
    groups = task.modality_parameters()
    audio, visual = {id(p) for p in groups["audio"]}, {id(p) for p in groups["visual"]}
    assert {id(p) for p in task.head.audio_fc1.parameters()} <= audio
    assert {id(p) for p in task.head.grounding_fc.parameters()} <= visual and not audio & visual
    metric = task.make_metric()
    task.update_metric(metric, out, batch)
    assert set(metric.compute()) >= {"acc", "acc_audio", "acc_av", "acc_audio_counting", "acc_av_temporal"}


# ----------------------------------------------------------------------------------- vocabularies and checkpoints


def test_vocab_from_datamodule_in_setup_and_checkpoint_round_trip(task):
    lazy = AVQATask(backbone=tiny_backbone(), head=TINY_HEAD)
    assert lazy.head is None
    with pytest.raises(RuntimeError, match="no vocabularies"):
        lazy._trainer = SimpleNamespace(datamodule=None)
        lazy.setup("fit")
    lazy._trainer = SimpleNamespace(datamodule=SimpleNamespace(answer_vocab=ANSWERS, question_vocab=WORDS))
    lazy.setup("fit")
    assert lazy.head.classifier.out_features == 5 and lazy.head.question_encoder.embed.num_embeddings == 7
    assert lazy.hparams["answer_vocab"] == ANSWERS, "saved with the hyper-parameters (load_from_checkpoint)"
    # A checkpoint carries the vocabularies; a model without them builds its head from the checkpoint.
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint[VOCAB_KEY] == {"answers": ANSWERS, "questions": WORDS}
    fresh = AVQATask(backbone=tiny_backbone(), head=TINY_HEAD)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    batch = tiny_batch(task, negatives=False)
    task.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)[1]["answer_logits"], task(batch)[1]["answer_logits"])
    # ... and refuses a DataModule or checkpoint whose vocabulary would permute the answers.
    fresh._trainer = SimpleNamespace(datamodule=SimpleNamespace(answer_vocab=ANSWERS[::-1], question_vocab=WORDS))
    with pytest.raises(ValueError, match="differ from the model's"):
        fresh.setup("test")
    with pytest.raises(ValueError, match="differ from the model's"):
        fresh.on_load_checkpoint({VOCAB_KEY: {"answers": ANSWERS, "questions": WORDS + ["extra"]}})


def test_text_model_question_encoder_from_local_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "how", "many", "is", "the", "violin"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    task = AVQATask(backbone=tiny_backbone(), head=AVQAHeadConfig(text_model=str(tmp_path / "bert"),
                                                                  match_hidden=[8, 8, 8]),
                    answer_vocab=ANSWERS, question_vocab=WORDS)
    assert task.head.uses_text_model
    batch = tiny_batch(task)
    task.train()
    assert not task.head.question_encoder.model.training, "a frozen text model stays in eval mode"
    _, out = task(batch)
    sum(task.compute_losses(out, batch).values()).backward()
    assert all(p.grad is None for p in task.head.question_encoder.model.parameters())
    assert task.head.question_encoder.fc.weight.grad.abs().sum() > 0
    # The frozen text model is rebuilt from its folder, so checkpoints leave its weights out.
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("head.question_encoder.model.") for k in checkpoint["state_dict"])
    assert "head.question_encoder.fc.weight" in checkpoint["state_dict"]
    batch["question_text"] = ["Is the violin", "How many"]  # the question text, not the ids, drives the answer
    task.eval()
    with torch.no_grad():
        swapped = task(batch)[1]["answer_logits"]
        batch["question_text"] = ["How many", "Is the violin"]
        assert not torch.allclose(swapped, task(batch)[1]["answer_logits"])


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from avmoe.datamodules.synthetic.musicavqa import write_musicavqa_release

    root = tmp_path_factory.mktemp("musicavqa_e2e")
    return write_musicavqa_release(root, num_videos=30, questions_per_video=6, num_instruments=3, seed=0,
                                   duration=8.0, size=32, fps=2)


def run_cli(args: list[str]) -> None:
    with mock.patch("sys.argv", ["avmoe"]):
        cli_main(args)


def cli_args(release: Path, runs: Path, cache: Path) -> list[str]:
    return [
        "--config", str(CONFIGS / "demo_avqa.yaml"),
        f"--data.init_args.root={release}",
        f"--data.init_args.cache_dir={cache}",
        "--data.init_args.num_workers=0",
        "--data.init_args.num_segments=2",
        "--data.init_args.clip_seconds=8",
        "--data.init_args.batch_size=8",
        f"--run.root={runs}",
        "--run.name=avqa",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_fit_test_predict_through_the_cli_beats_the_majority_baseline(release, in_tmp):
    runs, cache = in_tmp / "runs", in_tmp / "cache"
    run_cli(["fit", *cli_args(release, runs, cache), "--trainer.max_epochs=3", "--run.test_after_fit=true"])
    folder = runs / "avqa"
    metrics = json.loads((folder / "metrics" / "test.json").read_text())["metrics"]
    test_items = json.loads((release / "json_update" / "avqa-test.json").read_text(encoding="utf-8"))
    answers = collections.Counter(q["anser"] for q in test_items)
    majority = answers.most_common(1)[0][1] / len(test_items)  # the best constant answer on the test set itself
    assert metrics["test/acc"] > majority, (metrics, majority)
    present = {tuple(json.loads(q["type"])) for q in test_items}
    expected = {f"test/{type_key(QUESTION_TYPES.index(t))}" for t in present}
    expected |= {f"test/{group_key(g)}" for g, _ in present}
    assert expected <= set(metrics), "per-type and per-group accuracies are logged and written"

    # predict with the best checkpoint: answer strings with question IDs in the run folder.
    best = folder / "checkpoints" / "best.ckpt"
    run_cli(["predict", *cli_args(release, runs, cache), f"--ckpt_path={best}"])
    payload = json.loads((folder / "predictions" / "avqa_predictions.json").read_text(encoding="utf-8"))
    records = payload["predictions"]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in test_items]
    assert [r["video_id"] for r in records] == [q["video_id"] for q in test_items]
    assert all(r["answer"] == payload["answer_vocab"][r["answer_index"]] for r in records)
    correct = sum(r["answer"] == q["anser"] for r, q in zip(records, test_items))
    assert correct / len(records) == pytest.approx(metrics["test/acc"], abs=1e-6), "same checkpoint, same answers"

    # load_from_checkpoint alone (no DataModule) restores the vocabularies and the answers.
    model = AVQATask.load_from_checkpoint(best, map_location="cpu")
    train_items = json.loads((release / "json" / "avqa-train.json").read_text(encoding="utf-8"))
    assert model.answer_vocab == list(dict.fromkeys(q["anser"] for q in train_items))
    assert torch.load(best, weights_only=True)[VOCAB_KEY]["answers"] == model.answer_vocab


@pytest.mark.parametrize("mode", ["zero", "aux"])
def test_init_from_builds_the_vocabulary_sized_head_from_the_checkpoint(mode, tmp_path):
    """``run.init_from`` (weights only, strict) into a model that has no vocabularies yet."""
    from avmoe.cli import init_weights  # noqa: PLC0415
    from avmoe.tasks.base import UnimodalConfig  # noqa: PLC0415

    torch.manual_seed(0)
    unimodal = UnimodalConfig(mode=mode)
    source = AVQATask(backbone=tiny_backbone(), head=TINY_HEAD, answer_vocab=ANSWERS, question_vocab=WORDS,
                      unimodal=unimodal)
    checkpoint = {"state_dict": source.state_dict()}
    source.on_save_checkpoint(checkpoint)
    path = tmp_path / "source.ckpt"
    torch.save(checkpoint, path)
    fresh = AVQATask(backbone=tiny_backbone(), head=TINY_HEAD, unimodal=unimodal)
    assert init_weights(fresh, str(path), strict=True) == ([], [])
    batch = tiny_batch(source, negatives=False)
    source.eval(), fresh.eval()
    with torch.no_grad():
        feats = source.encode(batch)
        torch.testing.assert_close(fresh(batch)[1]["answer_logits"], source(batch)[1]["answer_logits"])
        if mode == "aux":
            torch.testing.assert_close(fresh.unimodal_outputs(feats, batch)["audio"]["answer_logits"],
                                       source.unimodal_outputs(feats, batch)["audio"]["answer_logits"])
