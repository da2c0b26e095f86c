"""Reading calibration files: LLaVA / ShareGPT4V or OpenAI-style ``messages`` JSON/JSONL, text JSONL; tables.

:func:`open_records` reads the format from the content: a ``datasets`` folder
or a parquet file goes to ``qig.calib.tables``, anything else is JSON or JSONL,
read here. Every record passes the one schema check
(``qig.calib.records.check_record``), so a bad row gets the same one-line
error in any format.
"""

from __future__ import annotations

import json
from pathlib import Path

from qig.calib.records import Records, check_record
from qig.calib.tables import open_table
from qig.errors import QigError

PARQUET_MAGIC = b"PAR1"


def open_records(path: Path) -> Records:
    """The records of a calibration file or ``datasets`` folder, schema-checked; the format is read from the content.

    A folder is a ``datasets`` folder, a file that starts as parquet files do
    (``PAR1``) is parquet (both: ``qig.calib.tables``), anything else JSON or JSONL.
    """
    path = Path(path)
    if path.is_dir() or _starts_with(path, PARQUET_MAGIC):
        return open_table(path)
    return Records(path, read_json_records(path))


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(index, record) pairs of a calibration file or ``datasets`` folder, schema-checked (images not read)."""
    return open_records(path).records


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except (OSError, ValueError):  # missing, a folder, a NUL in the name: read_json_records says which
        return False


def read_json_records(path: Path) -> list[tuple[int, dict]]:
    """(index, record) pairs of a JSON list or JSONL file, schema-checked."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise QigError(f"calibration file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise QigError(f"cannot read calibration file {path}: {exc}") from exc
    if not text.strip():
        raise QigError(f"calibration file {path} is empty; it needs a JSON list or JSONL of records")
    try:
        if text.lstrip().startswith("["):
            data = json.loads(text)
        else:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts (4300 digits)
        raise QigError(f"calibration file {path} is neither a JSON list nor JSONL: {exc}") from exc
    except RecursionError as exc:
        raise QigError(f"calibration file {path} nests its JSON too deeply to read; records are flat objects") from exc
    if not data:
        raise QigError(f"calibration file {path} holds no records")
    for i, rec in enumerate(data):
        check_record(rec, i, path)
    return list(enumerate(data))
