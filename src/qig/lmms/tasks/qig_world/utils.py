"""The ``qig_world`` task's functions: a record read and scored as ``qig eval`` reads and scores it.

A document is one record of ``qig world eval``'s data.json (LLaVA style:
``image``, ``conversations``, ``type``); the question and the gold answer come
from ``qig.evaluate._question``, the score is exact match after
``qig.evaluate.normalize_answer``.
"""

from __future__ import annotations

from pathlib import Path

from qig.errors import QigError
from qig.evaluate import _question, normalize_answer


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list:
    """The record's image, read from the task's ``image_folder``."""
    from PIL import Image, UnidentifiedImageError

    folder = Path((lmms_eval_specific_kwargs or {}).get("image_folder", "qig_world_data"))
    path = folder / doc["image"]
    try:
        return [Image.open(path).convert("RGB")]
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise QigError(
            f"record {doc.get('id')}: cannot read image {path} ({exc}); write the split with "
            f"`qig world eval --output {folder}` or use `qig eval --tasks qig_world`"
        ) from exc


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _question(doc)[0]


def doc_to_target(doc: dict) -> str:
    return _question(doc)[1]


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first generation against the gold answer, both normalised as ``qig eval`` does."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(_question(doc)[1]))}
