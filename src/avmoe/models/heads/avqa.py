"""AVQA head: audio-guided visual grounding, question encoder, question-guided temporal attention, fusion and
answer classifier, plus the audio-visual match MLP (ST-AVQA / LAVisH / AVMoE
``net_avst_v2.py``).

Widths follow the official model: everything runs at the width d of the final Swin tokens (1536 at paper scale);
the grounding compares the L2-normalised visual tokens with the projected, normalised audio of the same segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AVQAHeadConfig:
    """AVQA head settings; defaults are the official ones (widths come from the backbone and the vocabularies)."""

    word_dim: Optional[int] = None
    """Question word-embedding width; None = the head width d (official ``Embedding(93, 1536)``)."""
    lstm_layers: int = 1
    """Layers of the question LSTM (word-embedding question encoder)."""
    num_heads: int = 4
    """Heads of the question-guided temporal attention (``nn.MultiheadAttention(d, 4)``)."""
    dropout: float = 0.1
    """Dropout of the question-guided attention blocks."""
    match_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Hidden widths of the audio-visual match MLP (official 3072 -> 512 -> 256 -> 128 -> 2)."""
    num_classes: Optional[int] = None
    """Answer classifier outputs; None = the answer-vocabulary size (42). The released ``train_v2.sh`` passes
    ``--avqa_fc_class 50`` (8 never-used outputs) while its test script passes 42: set 50 to reproduce it."""
    text_model: Optional[str] = None
    """Local folder of a ``transformers`` text model + tokenizer (``save_pretrained`` layout) used as the
    question encoder instead of the word LSTM; never downloaded."""
    text_model_trainable: bool = False
    """Fine-tune the text model (default: frozen, in eval mode)."""
    text_max_length: int = 32
    """Token limit of questions fed to ``text_model``."""


class QuestionLSTM(nn.Module):
    """Official ``QstEncoder``: Embedding -> tanh -> LSTM over all padded tokens -> [h; c] -> tanh -> Linear."""

    def __init__(self, vocab_size: int, word_dim: int, out_dim: int, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.lstm = nn.LSTM(word_dim, out_dim, layers, batch_first=True)
        self.fc = nn.Linear(2 * layers * out_dim, out_dim)

    def forward(self, question: Tensor) -> Tensor:  # (B, L) int64 -> (B, d)
        x = torch.tanh(self.embed(question))  # (B, L, word_dim)
        _, (h, c) = self.lstm(x)  # each (layers, B, d); the padded tail is read too, as official
        state = torch.cat([h, c], dim=2).transpose(0, 1).flatten(1)  # (B, 2 * layers * d)
        return self.fc(torch.tanh(state))


class TextModelQuestionEncoder(nn.Module):
    """A local ``transformers`` text model (e.g. a BERT folder): first-token state -> tanh -> Linear(d)."""

    def __init__(self, path: str, out_dim: int, trainable: bool = False, max_length: int = 32) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.trainable = trainable
        self.max_length = max_length
        self.model.requires_grad_(trainable)
        self.fc = nn.Linear(self.model.config.hidden_size, out_dim)

    def train(self, mode: bool = True) -> "TextModelQuestionEncoder":
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # frozen: no dropout
        return self

    def forward(self, texts: Sequence[str]) -> Tensor:  # B strings -> (B, d)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = self.fc.weight.device
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state[:, 0]
        return self.fc(torch.tanh(hidden))


class QuestionAttention(nn.Module):
    """Question as the single query over T segment features, then FFN + residual + LayerNorm (official)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, seq: Tensor) -> Tensor:  # query (B, d), seq (B, T, d) -> (B, d)
        att = self.attn(query[:, None], seq, seq, need_weights=False)[0][:, 0]  # (B, d)
        att = att + self.drop2(self.ff2(self.drop1(F.relu(self.ff1(att)))))
        return self.norm(att)


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AVQAHead(nn.Module):
    """Answer logits from per-segment audio, the final visual tokens and the question.

    Args:
        visual_dim: width d of the final visual tokens (the head runs at this width).
        audio_dim: width of the pooled audio features.
        vocab_size: question vocabulary size (ignored with ``cfg.text_model``).
        num_answers: answer vocabulary size.
        cfg: settings.
    """

    def __init__(self, visual_dim: int, audio_dim: int, vocab_size: int, num_answers: int,
                 cfg: AVQAHeadConfig = AVQAHeadConfig()) -> None:
        super().__init__()
        d = visual_dim
        self.cfg = cfg
        num_classes = cfg.num_classes if cfg.num_classes is not None else num_answers
        if num_classes < num_answers:
            raise ValueError(f"num_classes={num_classes} is smaller than the answer vocabulary ({num_answers})")
        self.audio_fc1, self.audio_fc2 = nn.Linear(audio_dim, d), nn.Linear(d, d)  # official fc_a1, fc_a2
        self.grounding_fc = nn.Linear(2 * d, d)  # official fc_gl: [avg-pool; grounded] -> d
        self.match = _mlp([2 * d, *cfg.match_hidden, 2])  # official fc1..fc4
        self.question_encoder: nn.Module
        if cfg.text_model:
            self.question_encoder = TextModelQuestionEncoder(cfg.text_model, d, cfg.text_model_trainable,
                                                             cfg.text_max_length)
        else:
            self.question_encoder = QuestionLSTM(vocab_size, cfg.word_dim or d, d, cfg.lstm_layers)
        self.visual_attn = QuestionAttention(d, cfg.num_heads, cfg.dropout)
        self.audio_attn = QuestionAttention(d, cfg.num_heads, cfg.dropout)
        self.fusion = nn.Linear(2 * d, d)
        self.classifier = nn.Linear(d, num_classes)  # official fc_ans

    @property
    def uses_text_model(self) -> bool:
        return isinstance(self.question_encoder, TextModelQuestionEncoder)

    def modality_modules(self) -> dict[str, list[nn.Module]]:
        """Uni-modal branches; grounding reads audio but produces the visual stream, so it is visual's."""
        return {"audio": [self.audio_fc1, self.audio_fc2, self.audio_attn],
                "visual": [self.grounding_fc, self.visual_attn]}

    def split_fusion(self) -> tuple[nn.Linear, dict[str, slice]]:
        """``fusion`` reads ``[audio; visual]`` (d columns each): the layer the official split head slices."""
        d = self.fusion.in_features // 2
        return self.fusion, {"audio": slice(0, d), "visual": slice(d, 2 * d)}

    def project_audio(self, audio: Tensor) -> Tensor:  # (B, T, Ca) -> (B, T, d)
        return self.audio_fc2(F.relu(self.audio_fc1(audio)))

    def ground(self, tokens: Tensor, audio: Tensor) -> Tensor:
        """Audio-guided grounding. tokens (B, T, N, d), projected audio (B, T, d) -> (B, T, d)."""
        pooled = tokens.mean(2)  # (B, T, d): the "before grounding" average pool
        keys = F.normalize(tokens, dim=-1)
        sim = torch.einsum("btnc,btc->btn", keys, F.normalize(audio, dim=-1))  # cosine similarity
        grounded = torch.einsum("btn,btnc->btc", sim.softmax(-1), keys)  # (B, T, d)
        return self.grounding_fc(torch.tanh(torch.cat([pooled, grounded], dim=-1)))

    def forward(
        self,
        visual_tokens: Tensor,
        audio: Tensor,
        question: Union[Tensor, Sequence[str]],
        negative_tokens: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """visual_tokens (B, T, N, d), audio (B, T, Ca), question (B, L) ids or B strings (text model),
        negative_tokens (B, T, N, d) frames of other videos or None.

        Returns ``answer_logits`` (B, num_classes) and, with negatives, ``match_pos`` / ``match_neg`` (B, T, 2).
        """
        a = self.project_audio(audio)  # (B, T, d)
        v = self.ground(visual_tokens, a)  # (B, T, d)
        out: dict[str, Tensor] = {}
        if negative_tokens is not None:
            out["match_pos"] = self.match(torch.cat([a, v], dim=-1))  # (B, T, 2)
            out["match_neg"] = self.match(torch.cat([a, self.ground(negative_tokens, a)], dim=-1))
        q = self.question_encoder(question)  # (B, d)
        v_att = self.visual_attn(q, v)
        a_att = self.audio_attn(q, a)
        feat = torch.cat([a_att + a.mean(1), v_att + v.mean(1)], dim=-1)  # (B, 2d)
        feat = self.fusion(torch.tanh(feat))
        out["answer_logits"] = self.classifier(torch.tanh(feat * q))
        return out
