"""Reading calibration records from files: LLaVA / ShareGPT4V JSON or JSONL, text JSONL; their images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qig.errors import QigError

log = logging.getLogger(__name__)


def read_records(path: Path) -> list[tuple[int, dict]]:
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
        _check_schema(rec, i, path)
    return list(enumerate(data))


def _check_schema(rec, i: int, path: Path) -> None:
    where = f"record {i} of {path}"
    if not isinstance(rec, dict):
        raise QigError(f"{where} is a {type(rec).__name__}; expected an object with 'conversations' or 'text'")
    if "text" in rec and "conversations" not in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise QigError(f"{where}: 'text' must be a non-empty string")
        _check_unicode(rec["text"], f"{where}: 'text'")
        return
    conv = rec.get("conversations")
    ok_turns = isinstance(conv, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("value"), str)
        and isinstance(t.get("from"), str)
        and t["from"] in ROLE_OF
        for t in conv
    )
    if not ok_turns or len(conv) < 2:
        raise QigError(
            f"{where} (id {rec.get('id', '?')}) needs 'conversations': a list of at least two "
            f"{{'from': 'human'|'gpt', 'value': str}} turns (or a plain {{'text': str}})"
        )
    if ROLE_OF[conv[-1]["from"]] != "assistant":
        raise QigError(f"{where} (id {rec.get('id', '?')}): the last turn must be the answer ('from': 'gpt')")
    image = rec.get("image")
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and all(isinstance(x, str) for x in image))
    ):
        raise QigError(f"{where} (id {rec.get('id', '?')}): 'image' must be a path or a list of paths")
    for j, turn in enumerate(conv):
        _check_unicode(turn["value"], f"{where}: turn {j}'s 'value'")
    for name in [image] if isinstance(image, str) else image or []:
        _check_unicode(name, f"{where}: image {name!r}")


def _check_unicode(text: str, what: str) -> None:
    """Refuse lone surrogates (JSON can escape them, "\\ud800"): no tokenizer or file system takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise QigError(
            f"{what} holds {bad!r}, half of a UTF-16 surrogate pair, not text; fix the file's encoding"
        ) from None


ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_images(rec: dict, i: int, folder: Path, path: Path):
    """The record's images as RGB PIL images (None for a text record); a file that is not one is refused."""
    from PIL import Image, UnidentifiedImageError

    names = rec.get("image")
    if names is None:
        return None
    names = [names] if isinstance(names, str) else names
    images = []
    for name in names:
        file = folder / name
        try:
            with Image.open(file) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError as exc:
            raise QigError(
                f"sample {rec.get('id', i)} of {path}: image {file} does not exist (image folder: {folder})"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            # ValueError: a name with a NUL byte; DecompressionBombError: a header claiming a gigapixel image
            raise QigError(f"sample {rec.get('id', i)} of {path}: cannot read image {file}: {exc}") from exc
    return images
