"""Calibration from tables: a Hugging Face ``datasets`` folder (``save_to_disk``) or a parquet file.

A table's rows become the records ``qig.calib.files`` reads from JSON, so they
pass the same schema check (``qig.calib.records``) and give the same errors.
Its columns are found by their usual names:

- images: ``image`` or ``images`` (``datasets``' Image feature, stored as
  ``{"bytes", "path"}``; raw bytes; or paths relative to the image folder; a
  list of them per row);
- what is said: ``conversations`` (LLaVA ``from`` / ``value`` turns) or
  ``messages`` (OpenAI-style ``role`` / ``content``), else a caption,
  ``caption`` or ``text``, which becomes the answer to the embedded world's
  describe-the-image prompt (a list of captions per image, as flickr30k's and
  COCO's, gives its first); ``text`` with no image column is a plain text
  sample (all answer), as in a text JSONL.

The text columns of every row are read and checked up front; images are read
only for the rows chosen. ``datasets`` and ``pyarrow`` are optional
(``pip install 'qig[data]'``).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from qig.calib.data import IMAGE_PLACEHOLDER
from qig.calib.records import Records, check_record, image_refs, open_image
from qig.errors import QigError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "images")
CONVERSATION_COLUMNS = ("conversations", "messages")
CAPTION_COLUMNS = ("caption", "text")
DATASETS_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes


class TableRecords(Records):
    """A table's rows as checked records; ``images`` reads a row's image cell when it is chosen."""

    def __init__(self, path: Path, records: list[tuple[int, dict]], images, image_column: str | None):
        super().__init__(path, records)
        self._images = images  # the image column: a pyarrow (Chunked)Array, or None
        self._image_column = image_column

    def images(self, i: int, rec: dict, folder: Path):
        where = f"sample {rec.get('id', i)} of {self.path}"
        inline = image_refs(rec)  # paths inline in ``messages`` content (check_record refused them with a column)
        cell = self._images[i].as_py() if self._images is not None else None
        if inline is not None:
            refs = inline
        elif cell is None:
            if rec.get("caption"):
                raise QigError(f"{where}: column '{self._image_column}' is empty; a caption needs its image")
            return None  # a text conversation, as a JSON record without 'image'
        else:
            refs = cell if isinstance(cell, list) else [cell]
        return [open_image(ref, folder, where) for ref in refs]


def open_table(path: Path) -> TableRecords:
    """The rows of a ``datasets`` folder or a parquet file as checked records (see the module docstring)."""
    return table_records(_read_datasets_folder(path) if path.is_dir() else _read_parquet(path), path)


def open_parquet_shards(files: list[Path], name: Path) -> TableRecords:
    """The rows of several parquet files (a hub dataset split's shards, in order) as one table's records."""
    pa = _require("pyarrow", f"the parquet files of {name}")
    tables = [_read_parquet(f) for f in files]
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (ValueError, TypeError) as exc:  # ArrowInvalid: the shards' schemas differ
        raise QigError(f"the parquet shards of {name} do not share one schema: {exc}") from exc
    return table_records(table, name)


def table_records(table, path: Path) -> TableRecords:
    """A pyarrow table's rows as checked records; ``path`` names the table and its parent is the image folder."""
    columns = list(table.column_names)
    image_col = _first(IMAGE_COLUMNS, columns)
    talk_col = _first(CONVERSATION_COLUMNS, columns)
    caption_col = _first(CAPTION_COLUMNS, columns)
    if talk_col is None and (caption_col is None or (caption_col == "caption" and image_col is None)):
        raise QigError(
            f"{path} has no column to calibrate from (its columns: {', '.join(columns) or 'none'}); it needs a "
            f"conversation column ({' or '.join(CONVERSATION_COLUMNS)}) or a caption column "
            f"({' or '.join(CAPTION_COLUMNS)}) with an image column ({' or '.join(IMAGE_COLUMNS)}), "
            "or a 'text' column alone (text samples)"
        )
    if table.num_rows == 0:
        raise QigError(f"{path} holds no rows")
    images = None
    if image_col is not None:
        _check_image_column(table.schema.field(image_col).type, image_col, path)
        images = table.column(image_col)
    ids = table.column("id").to_pylist() if "id" in columns else None
    records = []
    for i, value in enumerate(table.column(talk_col or caption_col).to_pylist()):
        rec = _record(value, talk_col, caption_col, image_col is not None, i, path)
        if ids is not None:
            rec["id"] = ids[i]
        check_record(rec, i, path)
        if images is not None and image_refs(rec) is not None and images[i].as_py():
            check_record(rec, i, path, images_given=True)  # refuses images inline and in the image column
        records.append((i, rec))
    log.info(
        "%s: %d rows; columns used: %s",
        path,
        len(records),
        ", ".join(c for c in (image_col, talk_col or caption_col) if c),
    )
    return TableRecords(path, records, images, image_col)


def _record(value, talk_col: str | None, caption_col: str | None, has_images: bool, i: int, path: Path) -> dict:
    """A row as the record JSON would hold: conversation turns, a caption as a question and its answer, or text."""
    if talk_col is not None:
        return {talk_col: value}
    if not has_images:
        return {"text": value}
    from qig.embedded.world import CAPTION_PROMPT

    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # several captions per image (flickr30k, COCO): the first

    if not isinstance(value, str) or not value.strip():
        raise QigError(f"record {i} of {path}: column '{caption_col}' holds {value!r}; a caption is a non-empty string")
    return {
        "caption": value,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": value},
        ],
    }


def _first(names: tuple[str, ...], columns: list[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def _check_image_column(kind, name: str, path: Path) -> None:
    """Refuse an image column whose type holds no images (arrow columns have one type, so this is per column)."""
    import pyarrow as pa

    def holds_image(t) -> bool:
        if pa.types.is_struct(t):
            return {t.field(j).name for j in range(t.num_fields)} & {"bytes", "path"} != set()
        return (
            pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
        )

    if pa.types.is_null(kind) or holds_image(kind):
        return
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        holds_image(kind.value_type) or pa.types.is_null(kind.value_type)
    ):
        return
    raise QigError(
        f"{path}: column '{name}' is of type {kind}; an image column holds images (datasets' Image feature, "
        "{'bytes', 'path'}), image bytes or paths, or a list of them per row"
    )


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise QigError(f"reading {what} needs the optional package {module}: pip install 'qig[data]'") from exc


def _read_datasets_folder(path: Path):
    """A ``save_to_disk`` folder as a pyarrow table; a DatasetDict folder with one split is that split."""
    if not any((path / m).is_file() for m in DATASETS_MARKERS):
        raise QigError(
            f"calibration path {path} is a folder but not a datasets folder (Dataset.save_to_disk writes "
            f"{', '.join(DATASETS_MARKERS[:2])}); give a JSON, JSONL or parquet file, or such a folder"
        )
    datasets = _require("datasets", f"the datasets folder {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: also pyarrow's ArrowInvalid, bad JSON
        raise QigError(f"cannot read the datasets folder {path}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            splits = ", ".join(ds) or "none"
            raise QigError(
                f"the datasets folder {path} holds the splits {splits}; give one split's folder, "
                f"e.g. {path / (next(iter(ds), 'train'))}"
            )
        ds = next(iter(ds.values()))
    return ds.with_format("arrow")[:]  # pyarrow.Table (memory-mapped: images are read per chosen row)


def _read_parquet(path: Path):
    pq = _require("pyarrow.parquet", f"the parquet file {path}")
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid
        raise QigError(f"cannot read the parquet file {path}: {exc}") from exc
