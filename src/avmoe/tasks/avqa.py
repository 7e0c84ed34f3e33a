"""AVQA: answer a question about a MUSIC-AVQA video (42 answers, 9 question types).

Vocabularies and the data -> model link. The question-embedding and answer-classifier sizes come from the data
(vocabularies built from the train file), so the task takes them from the DataModule in :meth:`AVQATask.setup`
(``trainer.datamodule.answer_vocab`` / ``question_vocab``) and builds the head there when it was not given them.
The vocabularies are then part of the hyper-parameters and of every checkpoint (``checkpoint["avqa_vocab"]``):

* ``AVQATask.load_from_checkpoint(path)`` rebuilds the head eagerly from the saved hyper-parameters, so a
  reloaded model maps predictions back to answer strings with no DataModule at all;
* ``fit|test|predict --ckpt_path FILE``: LightningCLI re-reads the checkpoint's hyper-parameters (hence the
  ``_class_path`` entry stored with them), so the head is built from the checkpoint's vocabularies; ``setup`` and
  :meth:`on_load_checkpoint` check that the DataModule's and the checkpoint's vocabularies are the same (a
  mismatch would silently permute answers, so it is an error);
* the vocabularies can also be given explicitly (``answer_vocab`` / ``question_vocab``).

``lightning_configs`` therefore need no ``link_arguments``; the one path this does not cover is the CLI's
weights-only ``run.init_from`` (it compares state-dict keys before ``setup``): pass the vocabularies explicitly
there.

Loss: ``CE(answer) + match_weight * CE(match)`` (official weight 0.5) where the match term classifies (audio,
frame) pairs of the same segment (label 1) against (audio, frame of another video) pairs (label 0); the negative
frames go through the plain frozen Swin (no adapters, no gradient), as in the official code. Samples whose audio
or visual modality is masked out are left out of the match term (there is no pair to judge).

``predict`` writes every prediction as an answer string with its probability and the ``predict_top_k`` best
answers, with its question ID, to a JSON file (``predictions_file``, default
``<trainer.default_root_dir>/predictions/avqa_predictions.json``, i.e. inside the CLI's run folder), one record per
question row, de-duplicated and in dataset order under DDP. The questions are the test split's, or those of
``data.predict_questions`` on the mp4 files of ``data.predict_dir`` (your own videos; the vocabularies are the
checkpoint's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from avmoe.datamodules.batch import AUDIO_MASK, INDEX, VISUAL_MASK
from avmoe.metrics.avqa import QUESTION_TYPES, AVQAAccuracy
from avmoe.models.config import AVMoEConfig
from avmoe.models.heads.avqa import AVQAHead, AVQAHeadConfig
from avmoe.models.heads.unimodal import Readout
from avmoe.models.outputs import BackboneOutput
from avmoe.models.presets import paper_config
from avmoe.tasks.base import AVTask, Batch, OptimConfig, Outputs, UnimodalConfig, as_config, plain

NEGATIVE_VIDEO = "negative_video"
NEGATIVE_TOKENS = "negative_tokens"
AUX_QUESTION = "aux_question_embedding"  # per-batch cache of the auxiliary heads' question embedding
VOCAB_KEY = "avqa_vocab"


class AVQATask(AVTask):
    """AVMoE backbone + AVQA head with the official losses and per-type accuracy.

    Args:
        backbone: AVMoE backbone configuration (default: paper scale with the AVQA adapters).
        head: AVQA head settings.
        optim: optimizer and schedule (official AVQA: Adam 1e-4, StepLR 8 / 0.1).
        match_weight: weight of the audio-visual match loss (official 0.5; 0 disables it).
        answer_vocab: answer strings by class index; None takes them from the DataModule in ``setup``.
        question_vocab: question words by token index (``<pad>`` first); None takes them from the DataModule.
        predictions_file: where ``predict`` writes its JSON; None = ``<default_root_dir>/predictions/``
            ``avqa_predictions.json``.
        predict_top_k: ``predict`` lists the k most probable answers of each question with their probabilities.
        unimodal: uni-modal predictions for the balancing callbacks (zeroed features or auxiliary heads).
        crmt: not available (True raises ValueError): the head is not a linear fusion of per-modality
            features (``crmt_unsupported`` says why).
    """

    crmt_unsupported = (
        "AVQA's answer logits are classifier(tanh(fusion(tanh([audio; visual])) * question)): both modalities "
        "pass through tanh and are multiplied with the question embedding, so the answer is not a linear fusion "
        "of per-modality features (CRMT's certified bound needs one)."
    )
    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: AVMoEConfig = paper_config("avqa"),
        head: AVQAHeadConfig = AVQAHeadConfig(),
        optim: OptimConfig = OptimConfig(lr=1e-4, step_size=8, gamma=0.1),
        match_weight: float = 0.5,
        answer_vocab: Optional[list[str]] = None,
        question_vocab: Optional[list[str]] = None,
        predictions_file: Optional[str] = None,
        unimodal: UnimodalConfig = UnimodalConfig(),
        predict_top_k: int = 5,
        crmt: bool = False,
    ) -> None:
        self.refuse_crmt(crmt)
        super().__init__(backbone=backbone, optim=optim, unimodal=unimodal)
        if predict_top_k < 1:
            raise ValueError(f"predict_top_k must be >= 1, got {predict_top_k}")
        self.predict_top_k = predict_top_k
        self.head_config = as_config(AVQAHeadConfig, head)
        self.match_weight = match_weight
        self.predictions_file = predictions_file
        self.answer_vocab: Optional[list[str]] = None
        self.question_vocab: Optional[list[str]] = None
        self.head: Optional[AVQAHead] = None
        self.save_hyperparameters(plain({
            # ``_class_path`` as LightningCLI itself stores it: ``--ckpt_path FILE`` re-parses the checkpoint's
            # hyper-parameters as a subclass spec (stock LightningCLI fails without it; avmoe.cli uses it if present).
            "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": self.backbone_config, "head": self.head_config, "optim": self.optim,
            "match_weight": match_weight, "answer_vocab": answer_vocab, "question_vocab": question_vocab,
            "unimodal": self.unimodal,
        }))  # predictions_file / predict_top_k are run settings, not model properties: left out of the checkpoint
        if answer_vocab is not None or question_vocab is not None:
            if answer_vocab is None or question_vocab is None:
                raise ValueError("give both answer_vocab and question_vocab, or neither")
            self.build_head(answer_vocab, question_vocab)

    # ---- vocabularies and the lazily built head --------------------------------------------------------------
    def build_head(self, answer_vocab: list[str], question_vocab: list[str]) -> None:
        """Create the head for these vocabularies and record them (hyper-parameters, checkpoints)."""
        if self.head is not None:
            self._check_vocab(answer_vocab, question_vocab, "build_head")
            return
        if not answer_vocab or not question_vocab:
            raise ValueError("the answer and question vocabularies must not be empty")
        self.answer_vocab, self.question_vocab = list(answer_vocab), list(question_vocab)
        dims = self.backbone.feature_dims
        self.head = AVQAHead(dims["visual"], dims["audio"], len(self.question_vocab), len(self.answer_vocab),
                             self.head_config).to(self.device)
        self.build_unimodal_heads()  # sized by the answer vocabulary, so built with the head
        self.hparams["answer_vocab"], self.hparams["question_vocab"] = self.answer_vocab, self.question_vocab

    def _check_vocab(self, answer_vocab: list[str], question_vocab: list[str], source: str) -> None:
        if list(answer_vocab) != self.answer_vocab or list(question_vocab) != self.question_vocab:
            raise ValueError(
                f"AVQATask: the vocabularies from {source} differ from the model's (answers {len(answer_vocab)} vs "
                f"{len(self.answer_vocab or [])}, words {len(question_vocab)} vs {len(self.question_vocab or [])}); "
                "class indices would not mean the same answers. Build the vocabularies from the same train file "
                "(MusicAVQADataModule.vocab_dir)."
            )

    def setup(self, stage: str) -> None:
        dm = self.task_datamodule
        answers, words = getattr(dm, "answer_vocab", None), getattr(dm, "question_vocab", None)
        if self.head is None:
            if answers is None or words is None:
                raise RuntimeError("AVQATask has no vocabularies: use a DataModule with answer_vocab/question_vocab "
                                   "(MusicAVQADataModule), pass answer_vocab/question_vocab, or load_from_checkpoint")
            self.build_head(answers, words)
        elif answers is not None and words is not None:
            self._check_vocab(answers, words, "the DataModule")

    def frozen_pretrained_prefixes(self) -> list[str]:
        """The base's frozen encoders plus a frozen text-model question encoder (rebuilt from its local folder)."""
        prefixes = super().frozen_pretrained_prefixes()
        if self.head_config.text_model and not self.head_config.text_model_trainable:
            prefixes.append("head.question_encoder.model.")
        return prefixes

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[VOCAB_KEY] = {"answers": self.answer_vocab, "questions": self.question_vocab}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        vocab = checkpoint.get(VOCAB_KEY)
        if vocab is not None and self.head is None:
            self.build_head(vocab["answers"], vocab["questions"])  # before the base fills in omitted weights
        elif vocab is not None:
            self._check_vocab(vocab["answers"], vocab["questions"], "the checkpoint")
        super().on_load_checkpoint(checkpoint)

    def _head(self) -> AVQAHead:
        if self.head is None:
            raise RuntimeError("AVQATask head is not built yet (no vocabularies; see AVQATask.setup)")
        return self.head

    def answer_strings(self, indices: Tensor) -> list[str]:
        """Class indices -> answer strings (indices past the vocabulary, possible with num_classes > 42, are
        reported as ``<unused:i>``)."""
        vocab = self.answer_vocab or []
        return [vocab[i] if i < len(vocab) else f"<unused:{i}>" for i in indices.tolist()]

    # ---- forward and losses ------------------------------------------------------------------------------------
    def negative_tokens(self, batch: Batch) -> Optional[Tensor]:
        """Final tokens of the negative frames from the plain frozen Swin, computed once per batch."""
        if self.match_weight <= 0 or NEGATIVE_VIDEO not in batch:
            return None
        if NEGATIVE_TOKENS not in batch:
            batch[NEGATIVE_TOKENS] = self.backbone.encode_visual_plain(batch[NEGATIVE_VIDEO])  # (B, T, N, C)
        return batch[NEGATIVE_TOKENS]

    def head_forward(self, feats: BackboneOutput, batch: Batch) -> Outputs:
        head = self._head()
        question = batch["question_text"] if head.uses_text_model else batch["question"]
        return head(feats.visual_tokens, feats.audio, question, self.negative_tokens(batch))

    def unimodal_outputs(self, feats: BackboneOutput, batch: Batch, mode: Optional[str] = None) -> dict[str, Outputs]:
        """Answer logits of each modality alone; the match outputs are dropped (judging an audio-visual pair needs
        both modalities, so a uni-modal loss has no match term)."""
        outputs = super().unimodal_outputs(feats, batch, mode)
        return {m: {k: v for k, v in out.items() if not k.startswith("match_")} for m, out in outputs.items()}

    # ---- auxiliary uni-modal heads ------------------------------------------------------------------------
    def make_unimodal_head(self, modality: str) -> nn.Module:
        """Answer logits from one modality's time-averaged features gated by the question embedding, as the fused
        classifier (``classifier(tanh(feat * q))``)."""
        head = self._head()
        d = head.classifier.in_features
        return nn.ModuleDict({"proj": Readout(self.backbone.feature_dims[modality], d),
                              "classifier": nn.Linear(d, head.classifier.out_features)})

    def unimodal_head_forward(self, modality: str, feats: BackboneOutput, batch: Batch) -> Outputs:
        aux = self.unimodal_heads[modality]  # type: ignore[index]
        x = aux["proj"](getattr(feats, modality).mean(1))  # (B, d)
        return {"answer_logits": aux["classifier"](torch.tanh(torch.tanh(x) * self.aux_question(batch)))}

    def aux_question(self, batch: Batch) -> Tensor:
        """The main head's question embedding without gradient (auxiliary losses train the modality, not the shared
        question encoder), encoded once per batch for both auxiliary heads (a text model is not cheap)."""
        encoder = self._head().question_encoder
        cached = batch.get(AUX_QUESTION)
        if cached is None or cached[0] is not encoder:  # keyed by the encoder: a batch may meet two models
            with torch.no_grad():
                text = batch["question_text"] if self._head().uses_text_model else batch["question"]
                cached = batch[AUX_QUESTION] = (encoder, encoder(text))  # (B, d)
        return cached[1]

    def unimodal_sample_loss(self, modality: str, outputs: Outputs, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs["answer_logits"].float(), batch["answer"], reduction="none")

    def compute_losses(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        losses = {"loss_qa": F.cross_entropy(outputs["answer_logits"], batch["answer"])}
        if "match_pos" in outputs and self.match_weight > 0:
            losses["loss_match"] = self.match_weight * self.match_loss(outputs, batch)
        return losses

    @staticmethod
    def match_loss(outputs: Outputs, batch: Batch) -> Tensor:
        """Mean CE over all (segment, positive) and (segment, negative) pairs of samples with both modalities."""
        pos, neg = outputs["match_pos"], outputs["match_neg"]  # (B, T, 2)
        b, t = pos.shape[:2]
        logits = torch.cat([pos, neg]).reshape(2 * b * t, 2)
        labels = torch.cat([torch.ones(b * t), torch.zeros(b * t)]).long().to(pos.device)
        # at least fp32 (bf16 logits are upcast), float64 stays float64
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                             reduction="none").view(2, b, t)
        weight = torch.ones(b, device=pos.device)
        for key in (AUDIO_MASK, VISUAL_MASK):
            if key in batch:
                weight = weight * (batch[key].to(weight) > 0)
        if weight.sum() == 0:
            return ce.sum() * 0.0
        return (ce * weight[None, :, None]).sum() / (2 * t * weight.sum())

    # ---- metric and per-sample scores -------------------------------------------------------------------------
    def make_metric(self) -> Metric:
        return AVQAAccuracy()

    def name_details(self, details: dict[str, Any]) -> dict[str, Any]:
        vocab = self.answer_vocab
        return {k: {(vocab[c] if vocab and c < len(vocab) else str(c)): v for c, v in d.items()}
                for k, d in details.items()}

    def update_metric(self, metric: Metric, outputs: Outputs, batch: Batch) -> None:
        metric.update(batch[INDEX], outputs["answer_logits"].argmax(-1), batch["answer"], batch["qtype"])

    def sample_scores(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Softmax probability of the correct answer."""
        probs = outputs["answer_logits"].float().softmax(-1)
        return probs.gather(1, batch["answer"][:, None]).squeeze(1)

    def sample_correct(self, outputs: Outputs, batch: Batch) -> Tensor:
        return (outputs["answer_logits"].argmax(-1) == batch["answer"]).float()

    # ---- prediction ------------------------------------------------------------------------------------------
    prediction_name = "avqa"

    def predictions(self, batch: Batch, outputs: Outputs) -> dict[str, Any]:
        """The most probable answer with its softmax probability, and the ``predict_top_k`` best (indices, probs)."""
        probs = outputs["answer_logits"].float().softmax(-1)  # (B, A)
        top_p, top_i = probs.topk(min(self.predict_top_k, probs.shape[-1]), dim=-1)  # (B, k), best first
        pred = top_i[:, 0]
        return {INDEX: batch[INDEX], "question_id": batch.get("question_id"), "answer": self.answer_strings(pred),
                "answer_index": pred, "score": top_p[:, 0], "top_index": top_i, "top_prob": top_p}

    def prediction_records(self, batch: Batch, predictions: dict[str, Any]) -> list[dict[str, Any]]:
        """Per question: the answer string with its probability (``score``) and the ``top_k`` answers with theirs,
        the question ID, video, question text, and the true answer and question type when known (-1: unknown)."""
        answers, pred = predictions["answer"], predictions["answer_index"]
        n = len(answers)
        truth = [a if i >= 0 else None for a, i in zip(self.answer_strings(batch["answer"].clamp(min=0)),
                                                         batch["answer"].tolist())] if "answer" in batch else [None] * n
        qids = batch["question_id"].tolist() if "question_id" in batch else [None] * n
        vids = batch.get("video_id") or [None] * n
        texts = batch.get("question_text") or [None] * n
        qtypes = batch["qtype"].tolist() if "qtype" in batch else [None] * n
        tops = zip(predictions["top_index"].tolist(), predictions["top_prob"].tolist())
        top_k = [[{"answer": a, "score": round(p, 6)} for a, p in zip(self.answer_strings(torch.tensor(ix)), ps)]
                 for ix, ps in tops]
        return [{"index": index, "question_id": qids[i], "video_id": vids[i], "question": texts[i],
                 "answer": answers[i], "answer_index": int(pred[i]), "score": round(float(predictions["score"][i]), 6),
                 "top_k": top_k[i], "label": truth[i],
                 "question_type": "/".join(QUESTION_TYPES[qtypes[i]]) if qtypes[i] is not None and qtypes[i] >= 0
                 else None}
                for i, index in enumerate(batch[INDEX].tolist())]

    def prediction_payload(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"answer_vocab": self.answer_vocab, "num_questions": len(records), "predictions": records}

    def prediction_path(self) -> Path:
        return Path(self.predictions_file) if self.predictions_file else super().prediction_path()
