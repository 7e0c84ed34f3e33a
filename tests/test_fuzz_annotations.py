"""Seeded fuzzing of the annotation readers: every mutated file parses or raises an AnnotationError naming it.

For each format the valid files come from the synthetic release writers (the session fixtures of conftest.py):
AVE ``Annotations.txt`` + split files, the LLP CSVs, the AVSBench S4 / MS3 meta-data CSVs and the MUSIC-AVQA JSON
files. Each case restores the valid files, applies one seeded mutation (1-3 byte edits, a line, field, encoding or
JSON-structure change) to one file and builds every split's Dataset through the real DataModule (annotation parsing
and checks only: no media is decoded). A case passes when it parses, or raises
:class:`~avmoe.datamodules.annotations.AnnotationError` whose ``path`` is one of the release's annotation files and
appears in the message. Anything else (a library exception, a RecursionError, ...) is a crash; the test lists every
crash with its seed and mutation, so a failure is reproducible with ``run_case(fmt, seed)``.
"""

from __future__ import annotations

import copy
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from avmoe.datamodules import AVEDataModule, AVSBenchDataModule, LLPDataModule, MusicAVQADataModule
from avmoe.datamodules.annotations import AnnotationError

CASES = {"ave": 250, "llp": 200, "s4": 200, "ms3": 100, "avqa": 200}
SEED = 11  # issue 11: change it to explore other cases; the suite keeps this one

# Bytes and values that break parsers: separators, quotes, brackets, NUL, invalid UTF-8 lead/continuation bytes.
NASTY_BYTES = b"&\t,\n\r\"'[]{}:\\-_.0159 \x00\x80\xbf\xc3\xe9\xef\xff"
NASTY_FIELDS = [
    "", " ", "-1", "0", "10", "11", "99", "1.5", "1e309", "nan", "inf", "1_0", "\u0661", "\uff11", "\x00", "\u00e9",
    "\u2028", "x" * 300, "\"", "'", "[", "]", "{}", "None", str(2**70), "9" * 5000, "Speech", "Dog", "Bark", "train",
    "val", "test", "dog_barking", "Speech,Dog", "Speech,", "a&b", "a\tb", "a,b",
]
NASTY_JSON = [
    None, True, False, 0, -1, 2**63, 2**70, -(2**70), 1.5, float("nan"), float("inf"), "", " ", "[]", "[\"a\"]",
    "[\"Audio\", \"Counting\"]", "[\"Audio\"]", "[1, 2]", "[[[[]]]]", "(", [], ["x"], ["Audio", "Counting"], {}, "x" * 300,
    "<Object>", "?", "\uff1f", "yes", "[" * 2000 + "]" * 2000, "9" * 5000,
]


@dataclass
class Release:
    """A working root whose annotation files are restored from ``pristine`` before every case."""

    root: Path
    pristine: dict[str, bytes]  # relative path -> valid content
    build: Callable[[Path], None]  # builds every split's Dataset
    text_sep: str  # field separator of the text formats ("" for JSON)

    def restore(self) -> None:
        for rel, data in self.pristine.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)


def _build_all(make: Callable[[str], object], root: Path) -> Callable[[Path], None]:
    template = make(str(root))  # never built: its per-process caches (parsed files) are empty

    def build(root: Path) -> None:
        dm = copy.copy(template)  # a fresh DataModule without re-running Lightning's hparams capture per case
        for split in ("train", "val", "test"):
            dm.build_dataset(split)  # type: ignore[attr-defined]

    return build


def _release(source: Path, dest: Path, files: list[str], dirs: list[str], build, sep: str) -> Release:
    for d in dirs:  # the layout check wants the media folders; their content is never read here
        (dest / d).mkdir(parents=True, exist_ok=True)
    pristine = {rel: (source / rel).read_bytes() for rel in files}
    release = Release(dest, pristine, build, sep)
    release.restore()
    return release


@pytest.fixture(scope="module")
def releases(tmp_path_factory, ave_release, llp_release, avs_release, avqa_release) -> dict[str, Release]:
    from avmoe.datamodules.synthetic.avsbench import write_avsbench_release  # noqa: PLC0415

    ms3_source = tmp_path_factory.mktemp("ms3_source")
    write_avsbench_release(ms3_source, setting="ms3", num_train=3, num_val=2, num_test=2, num_categories=2, seed=1,
                           size=16)
    tmp = tmp_path_factory.mktemp("fuzz")
    llp_files = ["AVVP_train.csv", "AVVP_val_pd.csv", "AVVP_test_pd.csv", "AVVP_eval_audio.csv",
                 "AVVP_eval_visual.csv"]
    out = {
        "ave": _release(ave_release, tmp / "ave", ["Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt"],
                        ["AVE"], _build_all(AVEDataModule, tmp / "ave"), "&"),
        "llp": _release(llp_release, tmp / "llp", llp_files, ["LLP_dataset/video"], _build_all(LLPDataModule, tmp / "llp"), "\t"),
        "avqa": _release(avqa_release, tmp / "avqa",
                         ["json/avqa-train.json"] + [f"json_update/avqa-{s}.json" for s in ("train", "val", "test")],
                         [], _build_all(MusicAVQADataModule, tmp / "avqa"), ""),
    }
    for setting, source in (("s4", avs_release), ("ms3", ms3_source)):
        dirs = [f"{setting}_data/{sub}" for sub in ("visual_frames", "audio_wav", "gt_masks")]
        out[setting] = _release(source, tmp / setting, [f"{setting}_meta_data.csv"], dirs,
                                _build_all(lambda root, s=setting: AVSBenchDataModule(root, setting=s), tmp / setting),
                                ",")
    return out


# ------------------------------------------------------------------------------------------------ mutations
def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(buf) + 1)
        byte = rng.choice(NASTY_BYTES) if rng.random() < 0.7 else rng.randrange(256)
        op = rng.choice(["set", "insert", "delete"]) if buf else "insert"
        if op == "set" and pos < len(buf):
            buf[pos] = byte
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        else:
            buf.insert(pos, byte)
        done.append(f"{op}@{pos}:{byte:#04x}")
    return bytes(buf), "bytes " + ",".join(done)


def mutate_lines(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    lines = data.split(b"\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "swap", "blank", "truncate", "empty", "header_only", "first_last"])
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "blank":
        lines.insert(i, rng.choice([b"", b" ", b"\t", b"\r"]))
    elif op == "truncate":
        return data[: rng.randrange(len(data) + 1)], "lines truncate"
    elif op == "empty":
        return b"", "lines empty"
    elif op == "header_only":
        return lines[0] + b"\n", "lines header_only"
    else:
        lines = lines[-2:] + lines[:-2]
    return b"\n".join(lines), f"lines {op} {i},{j}"


def mutate_fields(data: bytes, sep: str, rng: random.Random) -> tuple[bytes, str]:
    text = data.decode("utf-8")
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    fields = lines[i].split(sep)
    k = rng.randrange(len(fields))
    op = rng.choice(["replace", "replace", "replace", "drop", "add", "swap", "copy_other_line"])
    if op == "replace":
        fields[k] = rng.choice(NASTY_FIELDS)
    elif op == "drop":
        del fields[k]
    elif op == "add":
        fields.insert(k, rng.choice(NASTY_FIELDS))
    elif op == "swap":
        m = rng.randrange(len(fields))
        fields[k], fields[m] = fields[m], fields[k]
    else:
        other = lines[rng.randrange(len(lines))].split(sep)
        fields[k] = other[k] if k < len(other) else ""
    lines[i] = sep.join(fields)
    return "\n".join(lines).encode("utf-8"), f"fields {op} line {i + 1} field {k}"


def mutate_encoding(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    text = data.decode("utf-8")
    op = rng.choice(["utf16", "latin1", "bom", "crlf", "cr", "double_bom", "trailing_space"])
    if op == "utf16":
        return text.encode("utf-16"), op
    if op == "latin1":
        pos = rng.randrange(len(text) + 1)
        return (text[:pos] + "\u00e9" + text[pos:]).encode("latin-1", "replace"), op
    if op == "bom":
        return b"\xef\xbb\xbf" + data, op
    if op == "double_bom":
        return b"\xef\xbb\xbf\xef\xbb\xbf" + data, op
    if op == "crlf":
        return data.replace(b"\n", b"\r\n"), op
    if op == "cr":
        return data.replace(b"\n", b"\r"), op
    return b"\n".join(line + b"  " for line in data.split(b"\n")), op


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    items = json.loads(data)
    op = rng.choice(["value", "value", "value", "delete_key", "add_key", "duplicate_item", "drop_items", "not_list",
                     "wrap_item", "deep", "same_id", "long_int"])
    if op == "long_int":  # more digits than Python converts to int by default (json.dumps cannot write it)
        return data.replace(b'"question_id": ', b'"question_id": ' + b"9" * 5000, 1), op
    if op == "not_list":
        return json.dumps(rng.choice([{}, "x", 1, None, {"a": items}])).encode(), op
    if op == "deep":
        depth = rng.choice([50, 5000, 200_000])
        return ("[" * depth + "]" * depth).encode(), f"deep {depth}"
    if op == "drop_items":
        return json.dumps(items[: rng.randrange(len(items))]).encode(), op
    i = rng.randrange(len(items))
    item = items[i]
    key = rng.choice(sorted(item))
    if op == "value":
        item[key] = rng.choice(NASTY_JSON)
    elif op == "delete_key":
        del item[key]
    elif op == "add_key":
        item[rng.choice(["answer", "extra", ""])] = rng.choice(NASTY_JSON)
    elif op == "duplicate_item":
        items.insert(rng.randrange(len(items) + 1), dict(item))
    elif op == "wrap_item":
        items[i] = rng.choice([[item], json.dumps(item), None])
    else:
        item["question_id"] = items[rng.randrange(len(items))]["question_id"]
    return json.dumps(items, ensure_ascii=rng.random() < 0.5).encode(), f"json {op} item {i} key {key!r}"


def mutate(data: bytes, sep: str, rng: random.Random) -> tuple[bytes, str]:
    kinds = ["bytes", "lines", "encoding", "fields" if sep else "json"]
    kind = rng.choice(kinds + [kinds[-1]])  # the format-aware mutation twice as often
    if kind == "bytes":
        return mutate_bytes(data, rng)
    if kind == "lines":
        return mutate_lines(data, rng)
    if kind == "encoding":
        return mutate_encoding(data, rng)
    if kind == "fields":
        return mutate_fields(data, sep, rng)
    return mutate_json(data, rng)


# ------------------------------------------------------------------------------------------------------ run
def run_case(release: Release, seed: int) -> tuple[str, str]:
    """Apply mutation ``seed`` and build; returns ``(outcome, description)``, outcome ``parsed`` or ``refused``.

    Raises whatever the readers raise other than a well-formed AnnotationError (the crash being hunted).
    """
    rng = random.Random(seed)
    release.restore()
    rel = rng.choice(sorted(release.pristine))
    data, what = mutate(release.pristine[rel], release.text_sep, rng)
    (release.root / rel).write_bytes(data)
    what = f"{rel}: {what}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # release-quirk and duplicate-ID warnings are documented tolerances
        try:
            release.build(release.root)
        except AnnotationError as err:
            known = {str(release.root / name) for name in release.pristine}
            assert err.path in known and err.path in str(err), f"{what}: error names no annotation file: {err}"
            return "refused", what
    return "parsed", what


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_mutated_annotations_parse_or_name_the_file(releases: dict[str, Release], fmt: str) -> None:
    release = releases[fmt]
    outcomes = {"parsed": 0, "refused": 0}
    crashes = []
    for case in range(CASES[fmt]):
        seed = SEED * 100_000 + case
        try:
            outcome, _ = run_case(release, seed)
        except Exception as err:  # noqa: BLE001 - every crash is collected and reported with its seed
            crashes.append(f"seed {seed}: {type(err).__name__}: {str(err)[:300]}")
            continue
        outcomes[outcome] += 1
    release.restore()
    assert not crashes, f"{len(crashes)} of {CASES[fmt]} {fmt} cases crashed:\n" + "\n".join(crashes[:30])
    # The fuzzer must exercise both paths (mutations that keep a valid file and ones the readers refuse).
    assert outcomes["parsed"] >= CASES[fmt] // 20 and outcomes["refused"] >= CASES[fmt] // 4, outcomes


def test_unmutated_releases_parse(releases: dict[str, Release]) -> None:
    for release in releases.values():
        release.restore()
        release.build(release.root)


def test_fuzzer_is_deterministic(releases: dict[str, Release]) -> None:
    first = [run_case(releases["ave"], seed) for seed in range(20)]
    assert first == [run_case(releases["ave"], seed) for seed in range(20)]
    releases["ave"].restore()
