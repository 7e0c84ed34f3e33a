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

PAD = "<pad>"
MAX_QUESTION_LEN = 14
REQUIRED_KEYS = ("video_id", "question_id", "type", "question_content", "templ_values")
DuplicatePolicy = Literal["keep", "first", "error"]
_WARNED: set[str] = set()  # one duplicate-ID warning per file and process (prepare_data and setup both read)


def split_file(root: str | os.PathLike[str], folder: str, split: str) -> Path:
    return Path(root) / folder / f"avqa-{split}.json"


# ---------------------------------------------------------------------------------------------------------- parsing


def _json_list(value: Any, key: str, where: str) -> list[str]:
    """A list of strings stored as a string holding a JSON (or Python) list, or as a real list."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(value)  # the official code parses with literal_eval
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: {key!r} is not a list stored as a string: {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ValueError(f"{where}: {key!r} must be a list of strings, got {value!r}")
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


def _parse_row(item: Any, path: Path, row: int) -> dict[str, Any]:
    where = f"{path}, row {row}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    qid = item.get("question_id")
    where = f"{where} (question_id {qid})" if qid is not None else where
    missing = [k for k in REQUIRED_KEYS if k not in item]
    answer_key = "anser" if "anser" in item else "answer" if "answer" in item else None
    if missing or answer_key is None:
        missing += [] if answer_key else ["anser"]
        raise ValueError(f"{where}: missing key(s) {missing} (the release spells the answer key 'anser')")
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise ValueError(f"{where}: question_id must be an integer, got {qid!r}")
    video_id = item["video_id"]
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"{where}: video_id must be a non-empty string, got {video_id!r}")
    qtype = _json_list(item["type"], "type", where)
    if len(qtype) != 2:
        raise ValueError(f"{where}: 'type' must hold [modality, type], got {item['type']!r}")
    templ = _json_list(item["templ_values"], "templ_values", where)
    content, answer = item["question_content"], item[answer_key]
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"{where}: empty or non-string question_content {content!r}")
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"{where}: empty or non-string answer {answer!r}")
    try:
        type_idx = qtype_index(*qtype)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    tokens = tokenize_question(content, templ, where)
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
        ValueError: not a JSON array, or a malformed row; the message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MUSIC-AVQA annotation file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of question objects, got {type(data).__name__}")
    rows = [_parse_row(item, path, i) for i, item in enumerate(data)]
    frame = pd.DataFrame(rows, columns=["row", "video_id", "question_id", "qtype", "question_content", "tokens",
                                        "answer"])
    for col in ("row", "question_id", "qtype"):
        frame[col] = frame[col].astype(np.int64)
    return frame


def apply_duplicate_policy(table: pd.DataFrame, policy: DuplicatePolicy, path: Path) -> pd.DataFrame:
    """Handle repeated ``question_id`` s (55 in the original test file, with conflicting answers)."""
    dup = table["question_id"].duplicated(keep=False).to_numpy()
    if not dup.any():
        return table
    ids = sorted(set(table.loc[dup, "question_id"].tolist()))
    listing = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
    if policy == "error":
        raise ValueError(f"{path}: {len(ids)} question_id(s) occur more than once ({listing}); "
                         "use duplicate_question_ids=keep or first, or the json_update files")
    if policy == "first":
        kept = table[~table["question_id"].duplicated(keep="first")].reset_index(drop=True)
        rank_zero_warn(f"{path}: dropped {len(table) - len(kept)} row(s) repeating a question_id ({listing})")
        return kept
    if policy != "keep":
        raise ValueError(f"duplicate_question_ids must be 'keep', 'first' or 'error', got {policy!r}")
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
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
        word_ix = {w: i for i, w in enumerate(self.words)}
        ans_ix = {a: i for i, a in enumerate(self.answers)}
        questions = np.zeros((len(table), max_len), dtype=np.int64)  # 0 == <pad>
        answers = np.empty(len(table), dtype=np.int64)
        for i, (row, qid, tokens, answer) in enumerate(
            zip(table["row"], table["question_id"], table["tokens"], table["answer"])
        ):
            where = f"{path}, row {row} (question_id {qid})"
            if len(tokens) > max_len:
                raise ValueError(f"{where}: question has {len(tokens)} words, more than max_question_len={max_len}")
            unknown = [w for w in tokens if w not in word_ix]
            if unknown:
                raise ValueError(f"{where}: word(s) {unknown} are not in the question vocabulary "
                                 f"({len(self.words)} words from the train file)")
            if answer not in ans_ix:
                raise ValueError(f"{where}: answer {answer!r} is not in the answer vocabulary {self.answers}")
            questions[i, : len(tokens)] = [word_ix[w] for w in tokens]
            answers[i] = ans_ix[answer]
        return questions, answers
