"""MUSIC-AVQA annotations: the split JSON files, question tokenisation and the vocabularies.

Schema traps handled by :func:`read_avqa_json`: the answer key is ``anser`` (``answer`` is accepted too); ``type``
and ``templ_values`` are JSON lists stored as strings; questions end in ``?`` or the full-width ``？``; a
placeholder can be glued to the question mark (``<Object>?``); the original ``json/avqa-test.json`` and
``avqa-val.json`` repeat question IDs with conflicting answers (policy ``duplicate_question_ids``: ``keep`` every
row as the official evaluation does, ``first`` keeps the first row of each ID, ``error`` refuses the file).

Vocabularies (official ``dataloader_avst.py``): answers in order of first appearance over a train file, questions
``['<pad>']`` + words in order of first appearance over the same file.

Tokenisation (official): ``q = content.rstrip().split(' ')``; the last character of the last token is stripped
unconditionally (``?`` or ``？``); the k-th token containing ``<`` is replaced by ``templ_values[k]``; the result
is right-padded with ``<pad>`` to ``max_question_len`` (14). A longer question or a word/answer missing from the
vocabulary is an error naming the file, the row and the question ID (the official code raises too).
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_warn

from avmoe.metrics.avqa import QUESTION_TYPES, qtype_index

from .annotations import AnnotationError, read_annotation_text

PAD = "<pad>"
MAX_QUESTION_LEN = 14
REQUIRED_KEYS = ("video_id", "question_id", "type", "question_content", "templ_values")
PREDICT_KEYS = ("video_id", "question_content")  # a questions file to answer (read_question_list)
DuplicatePolicy = Literal["keep", "first", "error"]
# One duplicate-ID warning per file version and process (prepare_data and setup both read the same file); a file
# that changes (new size or mtime) warns again.
_WARNED: set[tuple[str, int, int]] = set()
INT64_MAX = 2**63 - 1


def split_file(root: str | os.PathLike[str], folder: str, split: str) -> Path:
    return Path(root) / folder / f"avqa-{split}.json"


# ---------------------------------------------------------------------------------------------------------- parsing


def _json_list(value: Any, key: str, path: Path, row: int, note: str | None = None) -> list[str]:
    """A list of strings stored as a string holding a JSON (or Python) list, or as a real list."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError, too many digits, too deeply nested
            try:
                parsed = ast.literal_eval(value)  # the official code parses with literal_eval
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise AnnotationError(path, f"{key!r} is not a list stored as a string: {value!r}", row,
                                      "row", note) from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise AnnotationError(path, f"{key!r} must be a list of strings, got {value!r}", row, "row", note)
    return parsed


def tokenize_question(content: str, templ_values: list[str], where: str = "<question>") -> list[str]:
    """Official tokenisation without padding (see the module docstring).

    Raises:
        ValueError: the number of ``<...>`` tokens differs from ``len(templ_values)``.
    """
    words = content.rstrip().split(" ")
    words[-1] = words[-1][:-1]  # the official code strips the last character unconditionally (? or ？)
    slots = [i for i, w in enumerate(words) if "<" in w]
    if len(slots) != len(templ_values):
        raise ValueError(
            f"{where}: question {content!r} has {len(slots)} placeholder(s) but templ_values has "
            f"{len(templ_values)} value(s) {templ_values}"
        )
    for i, value in zip(slots, templ_values):
        words[i] = value
    return words


def _parse_row(item: Any, path: Path, row: int, strict: bool = True) -> dict[str, Any]:
    """One question object. ``strict`` (annotation files): every key of the release is required. Otherwise (a
    questions file to answer): only ``video_id`` and ``question_content``; ``question_id`` defaults to the row,
    ``templ_values`` to ``[]``, an absent ``type`` gives ``qtype`` -1 and an absent answer ``None``."""
    def bad(reason: str) -> AnnotationError:
        qid = item.get("question_id") if isinstance(item, dict) else None
        return AnnotationError(path, reason, row, "row", None if qid is None else f"question_id {qid!r}")

    if not isinstance(item, dict):
        raise bad(f"expected a JSON object, got {type(item).__name__}")
    qid = item.get("question_id", None if strict else row)
    missing = [k for k in (REQUIRED_KEYS if strict else PREDICT_KEYS) if k not in item]
    answer_key = "anser" if "anser" in item else "answer" if "answer" in item else None
    if missing or (strict and answer_key is None):
        missing += [] if answer_key or not strict else ["anser"]
        raise bad(f"missing key(s) {missing}" + (" (the release spells the answer key 'anser')" if strict else ""))
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise bad(f"question_id must be an integer, got {qid!r}")
    if not 0 <= qid <= INT64_MAX:
        raise bad(f"question_id must lie in [0, 2**63 - 1] (stored as int64), got {qid}")
    video_id = item["video_id"]
    if not isinstance(video_id, str) or not video_id:
        raise bad(f"video_id must be a non-empty string, got {video_id!r}")
    note = f"question_id {qid!r}"
    qtype = _json_list(item["type"], "type", path, row, note) if "type" in item else None
    if qtype is not None and len(qtype) != 2:
        raise bad(f"'type' must hold [modality, type], got {item['type']!r}")
    templ = _json_list(item.get("templ_values", "[]"), "templ_values", path, row, note)
    content, answer = item["question_content"], item[answer_key] if answer_key else None
    if not isinstance(content, str) or not content.strip():
        raise bad(f"empty or non-string question_content {content!r}")
    if answer_key is not None and (not isinstance(answer, str) or not answer):
        raise bad(f"empty or non-string answer {answer!r}")
    try:
        type_idx = qtype_index(*qtype) if qtype is not None else -1
    except ValueError as err:
        raise bad(str(err)) from None
    try:
        tokens = tokenize_question(content, templ)
    except ValueError as err:
        raise bad(str(err).removeprefix("<question>: ")) from None
    return {
        "row": row,
        "video_id": video_id,
        "question_id": qid,
        "qtype": type_idx,
        "question_content": content,
        "tokens": tokens,
        "answer": answer,
    }


def read_avqa_json(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse one MUSIC-AVQA annotation file.

    Returns:
        One row per JSON object, in file order, with columns ``row`` (0-based position in the file),
        ``video_id`` (str), ``question_id`` (int64), ``qtype`` (index into ``QUESTION_TYPES``),
        ``question_content`` (str), ``tokens`` (list of words, unpadded, placeholders substituted) and ``answer``.

    Raises:
        FileNotFoundError: no such file.
        AnnotationError: (a ``ValueError``) not UTF-8, not valid JSON, not a JSON array, or a malformed row
            (missing keys, a ``question_id`` that is not an integer in int64 range, ...); the message names the
            file and the 0-based row (for invalid JSON, the 1-based line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MUSIC-AVQA annotation file not found: {path}")
    return _table([_parse_row(item, path, i) for i, item in enumerate(_json_array(path))])


def read_question_list(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Questions to answer (``predict`` on your own videos): a JSON array in the MUSIC-AVQA question format.

    Only ``video_id`` and ``question_content`` are required; ``templ_values`` fills the ``<...>`` placeholders as
    in the release (``"[\\"violin\\"]"`` or a real list), ``question_id`` defaults to the 0-based row, ``type`` and
    ``anser`` are used when present (question type and true answer in the predictions). Tokenised as the release.

    Returns:
        The columns of :func:`read_avqa_json`; ``qtype`` is -1 without ``type``, ``answer`` None without ``anser``.

    Raises:
        FileNotFoundError: no such file.
        AnnotationError: as :func:`read_avqa_json` (names the file, the row and the question ID), or no question.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.predict_questions: questions file {path} not found")
    table = _table([_parse_row(item, path, i, strict=False) for i, item in enumerate(_json_array(path))])
    if table.empty:
        raise AnnotationError(path, "no question (expected a JSON array of objects with video_id and "
                              "question_content)")
    return table


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["row", "video_id", "question_id", "qtype", "question_content", "tokens",
                                        "answer"])
    for col in ("row", "question_id", "qtype"):
        frame[col] = frame[col].astype(np.int64)
    return frame


def _json_array(path: Path) -> list[Any]:
    """The file's JSON array; anything else is an :class:`AnnotationError` naming the file."""
    text = read_annotation_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, f"not valid JSON ({err.msg}, column {err.colno})", err.lineno) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise AnnotationError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise AnnotationError(path, "not valid JSON for this reader: nested too deeply (the release is an array "
                              "of flat objects)") from None
    if not isinstance(data, list):
        raise AnnotationError(path, f"expected a JSON array of question objects, got {type(data).__name__}")
    return data


def apply_duplicate_policy(table: pd.DataFrame, policy: DuplicatePolicy, path: Path) -> pd.DataFrame:
    """Handle repeated ``question_id`` s (55 in the original test file, with conflicting answers)."""
    dup = table["question_id"].duplicated(keep=False).to_numpy()
    if not dup.any():
        return table
    ids = sorted(set(table.loc[dup, "question_id"].tolist()))
    listing = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
    if policy == "error":
        raise AnnotationError(path, f"{len(ids)} question_id(s) occur more than once ({listing}); "
                              "use duplicate_question_ids=keep or first, or the json_update files")
    if policy == "first":
        kept = table[~table["question_id"].duplicated(keep="first")].reset_index(drop=True)
        rank_zero_warn(f"{path}: dropped {len(table) - len(kept)} row(s) repeating a question_id ({listing})")
        return kept
    if policy != "keep":
        raise ValueError(f"duplicate_question_ids must be 'keep', 'first' or 'error', got {policy!r}")
    try:
        stat = os.stat(path)
        version = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        version = (str(path), -1, -1)
    if version not in _WARNED:
        _WARNED.add(version)
        rank_zero_warn(f"{path}: {len(ids)} question_id(s) occur more than once ({listing}); every row is kept "
                       "and evaluated (official behaviour). Samples are keyed by row, predictions list each row.")
    return table


# ------------------------------------------------------------------------------------------------------ vocabulary


@dataclass
class AVQAVocab:
    """Answer and question-word vocabularies (official first-appearance order)."""

    answers: list[str]
    words: list[str]

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> "AVQAVocab":
        answers = list(dict.fromkeys(table["answer"].tolist()))
        words = list(dict.fromkeys([PAD] + [w for tokens in table["tokens"] for w in tokens]))
        return cls(answers=answers, words=words)

    def encode(self, table: pd.DataFrame, path: Path, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(questions (N, max_len) int64, answers (N,) int64)``; errors name the file, row and question ID."""
        questions = self.encode_questions(table, path, max_len)
        ans_ix = {a: i for i, a in enumerate(self.answers)}
        answers = np.empty(len(table), dtype=np.int64)
        for i, (row, qid, answer) in enumerate(zip(table["row"], table["question_id"], table["answer"])):
            if answer not in ans_ix:
                raise AnnotationError(path, f"answer {answer!r} is not in the answer vocabulary {self.answers}",
                                      int(row), "row", f"question_id {qid}")
            answers[i] = ans_ix[answer]
        return questions, answers

    def encode_questions(self, table: pd.DataFrame, path: Path, max_len: int,
                         source: str = "from the train file") -> np.ndarray:
        """``(N, max_len)`` int64 token indices, right-padded with ``<pad>`` (0); a word outside the vocabulary or a
        question longer than ``max_len`` is an :class:`AnnotationError` naming the file, row and question ID."""
        word_ix = {w: i for i, w in enumerate(self.words)}
        questions = np.zeros((len(table), max_len), dtype=np.int64)  # 0 == <pad>
        for i, (row, qid, tokens) in enumerate(zip(table["row"], table["question_id"], table["tokens"])):
            def bad(reason: str) -> AnnotationError:
                return AnnotationError(path, reason, int(row), "row", f"question_id {qid}")

            if len(tokens) > max_len:
                raise bad(f"question has {len(tokens)} words, more than max_question_len={max_len}")
            unknown = [w for w in tokens if w not in word_ix]
            if unknown:
                raise bad(f"word(s) {unknown} are not in the question vocabulary ({len(self.words)} words {source})")
            questions[i, : len(tokens)] = [word_ix[w] for w in tokens]
        return questions

    def answer_indices(self, answers: Any) -> np.ndarray:
        """``(N,)`` int64 class index of each answer string; -1 for None or an answer outside the vocabulary."""
        ans_ix = {a: i for i, a in enumerate(self.answers)}
        return np.asarray([ans_ix.get(a, -1) if a is not None else -1 for a in answers], dtype=np.int64)
