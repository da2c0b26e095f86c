"""A calibration source named on the command line: a local file or folder, or a hub dataset id and its split.

    >>> from qig.calib.hubdata import open_source
    >>> records = open_source("lmms-lab/flickr30k", split="test")  # doctest: +SKIP
    >>> records.path  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/datasets--lmms-lab--flickr30k/snapshots/<commit>/test')

A hub dataset's data files are found in its snapshot (``qig.hub.resolve_dataset``)
by the names the hub gives them: ``<split>-00000-of-00003.parquet`` (possibly
under ``data/`` or a config folder) or ``<split>.parquet`` / ``.json`` /
``.jsonl``; a split's parquet shards are read as one table, in name order.
Relative image paths in it are under the snapshot folder unless
``--image-folder`` says otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qig.calib.files import open_records
from qig.calib.records import Records
from qig.errors import QigError

DATA_SUFFIXES = (".parquet", ".json", ".jsonl")
_SHARD = re.compile(r"-\d+-of-\d+$")


def open_source(path: str | os.PathLike, split: str | None = None) -> Records:
    """The records of ``path``: a local calibration file or folder, else a hub dataset id (``split``: which split)."""
    from qig.hub import looks_like_repo_id, resolve_dataset

    local = Path(path)
    if local.exists() or not looks_like_repo_id(os.fspath(path)):
        if split is not None:
            raise QigError(f"--calib-split goes with a hub dataset id, not with the file {path}; drop it")
        return open_records(local)
    snapshot = resolve_dataset(os.fspath(path))
    chosen, files = _split_files(snapshot.path, os.fspath(path), split)
    name = snapshot.path / chosen  # names the split in messages; its parent is the image folder's default
    if all(f.suffix == ".parquet" for f in files):
        from qig.calib.tables import open_parquet_shards

        return open_parquet_shards(files, name)
    if len(files) > 1:
        raise QigError(
            f"split {chosen!r} of {path} is {len(files)} JSON files ({', '.join(f.name for f in files)}); "
            "qig reads one JSON or JSONL file per split: pass one of them with --calib"
        )
    return open_records(files[0])


def splits(folder: Path) -> dict[str, list[Path]]:
    """A snapshot's data files by split name (``train-00000-of-00002.parquet`` is split ``train``)."""
    found: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in DATA_SUFFIXES and not f.name.startswith("."):
            found.setdefault(_SHARD.sub("", f.stem), []).append(f)
    return found


def _split_files(folder: Path, repo_id: str, split: str | None) -> tuple[str, list[Path]]:
    found = splits(folder)
    if not found:
        raise QigError(
            f"hub dataset {repo_id} has no parquet, JSON or JSONL data files in its snapshot ({folder}); "
            "download its data files, or pass a local file with --calib"
        )
    if split is None:
        if len(found) == 1:
            return next(iter(found.items()))
        raise QigError(f"hub dataset {repo_id} has the splits {', '.join(found)}; choose one with --calib-split")
    if split not in found:
        raise QigError(f"hub dataset {repo_id} has no split {split!r}; its splits: {', '.join(found)}")
    return split, found[split]
