"""The pool of each release and the writers of the selected subset in the release's own split-file format.

Pool units (what is selected), in the order of the DataModule's train Dataset (after ``limit_samples``):

- AVE: a row of ``trainSet.txt`` (``Category&VideoID&Quality&StartTime&EndTime``), ID = ``VideoID``
  (+ ``#k`` when a VideoID repeats);
- LLP: a row of ``AVVP_train.csv`` (TAB-separated, header), ID = ``filename``;
- AVSBench: a ``train`` row of ``s4_meta_data.csv`` / ``ms3_meta_data.csv``, ID = the video name (column 0);
- MUSIC-AVQA: a *video* of ``<annotations>/avqa-train.json`` (the questions of a video share its frames and
  sound), represented by its first question; selecting it keeps all its train questions.

:func:`write_selected_root` writes a folder that mirrors the release root (every entry a symbolic link to the
original) except the train split file, replaced by the subset: its header and non-train lines unchanged and the
selected rows verbatim, in file order. Training on the subset is then ``--data.init_args.root <that folder>``
with the normal config. (MUSIC-AVQA: the vocabularies come from ``<vocab_dir>/avqa-train.json``; with the default
``annotations: json_update``, ``vocab_dir: json`` that file stays the full one, so the model keeps its answer set.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from avmoe.datamodules.ave import SPLIT_FILES as AVE_FILES
from avmoe.datamodules.ave import AVEDataModule, read_ave_list
from avmoe.datamodules.avsbench import AVSBenchDataModule, meta_csv_name, read_avsbench_csv
from avmoe.datamodules.base import AVDataModule
from avmoe.datamodules.llp import SPLIT_FILES as LLP_FILES
from avmoe.datamodules.llp import LLPDataModule, read_weak_labels
from avmoe.datamodules.musicavqa import MusicAVQADataModule


@dataclass
class Pool:
    """What can be selected: ``ids`` (U,) and the train Dataset position of each unit's representative sample."""

    ids: list[str]
    positions: np.ndarray  # (U,) int64
    split_file: Path  # the file a subset of which is written
    lines: np.ndarray  # (U,) 1-based line (text formats) or the video's json rows are found via ``rows``
    all_train_lines: np.ndarray  # every train row's line in the file (including rows beyond limit_samples)
    rows: list[np.ndarray] | None = None  # MUSIC-AVQA: per unit, the 0-based json rows of its questions


def _unique_ids(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}#{k}")
    return out


def build_pool(dm: AVDataModule) -> Pool:
    """The train pool of a DataModule (labels are never read for selection; the parsers only locate rows)."""
    size = dm.dataset_size("train")
    root = Path(dm.root)
    if isinstance(dm, AVEDataModule):
        path = root / AVE_FILES["train"]
        table = read_ave_list(path)
        sub = table.iloc[:size]
        return Pool(_unique_ids(sub["video_id"].tolist()), np.arange(size), path, sub["line"].to_numpy(),
                    table["line"].to_numpy())
    if isinstance(dm, LLPDataModule):
        path = root / LLP_FILES["train"]
        table = read_weak_labels(path)
        sub = table.iloc[:size]
        return Pool(_unique_ids(sub["filename"].tolist()), np.arange(size), path, sub["line"].to_numpy(),
                    table["line"].to_numpy())
    if isinstance(dm, AVSBenchDataModule):
        path = root / meta_csv_name(dm.setting)
        table = read_avsbench_csv(path, dm.setting)
        train = table[table["split"] == "train"]
        sub = train.iloc[:size]
        return Pool(_unique_ids(sub["video_id"].tolist()), np.arange(size), path, sub["line"].to_numpy(),
                    train["line"].to_numpy())
    if isinstance(dm, MusicAVQADataModule):
        path = dm.split_path("train")
        table = dm.read_split("train").iloc[:size].reset_index(drop=True)
        first = table.drop_duplicates("video_id", keep="first")
        rows = [table.loc[table["video_id"] == vid, "row"].to_numpy() for vid in first["video_id"]]
        return Pool([str(v) for v in first["video_id"]], first.index.to_numpy(dtype=np.int64), path,
                    first["row"].to_numpy(), dm.read_split("train")["row"].to_numpy(), rows)
    raise TypeError(f"select: no split-file writer for {type(dm).__name__} (AVE, LLP, AVSBench, MUSIC-AVQA)")


def subset_text(path: Path, all_train_lines: np.ndarray, selected_lines: np.ndarray) -> bytes:
    """The file with every train row dropped except ``selected_lines`` (bytes kept verbatim, line endings too)."""
    raw = path.read_bytes().splitlines(keepends=True)
    drop = set(int(x) for x in all_train_lines) - set(int(x) for x in selected_lines)
    return b"".join(line for no, line in enumerate(raw, start=1) if no not in drop)


def subset_json(path: Path, selected_rows: np.ndarray) -> bytes:
    """The JSON array with only the objects at ``selected_rows`` (0-based), in file order."""
    with open(path, encoding="utf-8-sig") as handle:
        data = json.load(handle)
    keep = set(int(r) for r in selected_rows)
    return json.dumps([item for i, item in enumerate(data) if i in keep], ensure_ascii=False).encode("utf-8")


def mirror_root(src: Path, dst: Path, replaced: dict[str, bytes]) -> None:
    """``dst`` mirrors ``src`` by symbolic links; the files in ``replaced`` (paths relative to src) are written."""
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    heads = {Path(rel).parts[0]: rel for rel in replaced}
    for entry in sorted(os.listdir(src)):
        target = dst / entry
        if entry in heads and len(Path(heads[entry]).parts) > 1:
            sub = {str(Path(*Path(rel).parts[1:])): data for rel, data in replaced.items() if Path(rel).parts[0] == entry}
            mirror_root(src / entry, target, sub)
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        if entry in heads:
            tmp = target.with_name(f".{entry}.{os.getpid()}.tmp")
            tmp.write_bytes(replaced[entry])
            os.replace(tmp, target)
        elif not target.exists():
            target.symlink_to(src / entry)


def write_selected_root(dm: AVDataModule, pool: Pool, selected: np.ndarray, out_root: Path) -> Path:
    """Write the release mirror for the pool units ``selected`` (positions into the pool); returns the split file."""
    selected = np.asarray(selected, dtype=np.int64)
    if pool.rows is not None:
        rows = np.concatenate([pool.rows[u] for u in selected]) if len(selected) else np.zeros(0, dtype=np.int64)
        data = subset_json(pool.split_file, rows)
    else:
        data = subset_text(pool.split_file, pool.all_train_lines, pool.lines[selected])
    rel = str(pool.split_file.resolve().relative_to(Path(dm.root).resolve()))
    mirror_root(Path(dm.root), out_root, {rel: data})
    return Path(out_root) / rel


def selection_frame(pool: Pool, order: np.ndarray) -> pd.DataFrame:
    """Rank (0-based selection order) of every selected unit: columns ``rank``, ``position``, ``id``."""
    return pd.DataFrame({"rank": np.arange(len(order)), "position": order, "id": [pool.ids[i] for i in order]})
