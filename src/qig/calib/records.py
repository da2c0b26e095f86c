"""A calibration record: the one schema check every format's records pass, and the record's images.

A record is a LLaVA / ShareGPT4V ``conversations`` record, an OpenAI-style
``messages`` record or a text record; :func:`check_record` refuses anything
else with a one-line error, whichever file or table it came from
(``qig.calib.files`` reads JSON / JSONL, ``qig.calib.tables`` tables).

    >>> check_record({"text": "a plain text sample"}, 0, Path("data.jsonl"))
    >>> image_refs({"image": "cat.png", "conversations": []})
    ['cat.png']
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from qig.errors import QigError

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("user", "assistant", "system")  # the roles of an OpenAI-style message
IMAGE_KEYS = ("image", "images")  # a record's images: one path or a list of paths
INLINE_IMAGE_KEYS = ("image", "path")  # an image content item's own path: {"type": "image", "image": "x.png"}


@dataclass
class Records:
    """A calibration file's schema-checked records, as (index, record); images are read on demand."""

    path: Path
    records: list[tuple[int, dict]]

    def images(self, i: int, rec: dict, folder: Path):
        """Record ``i``'s images as RGB PIL images (None: a text record), paths relative to ``folder``."""
        return load_images(rec, i, folder, self.path)


def check_record(rec, i: int, path: Path, images_given: bool = False) -> None:
    """Refuse a record that is not a text, a LLaVA ``conversations`` or an OpenAI-style ``messages`` record.

    images_given: the images come from elsewhere (a table's image column), so
    inline image paths in ``messages`` would give them twice.
    """
    where = f"record {i} of {path}"
    if not isinstance(rec, dict):
        raise QigError(
            f"{where} is a {type(rec).__name__}; expected an object with 'conversations', 'messages' or 'text'"
        )
    if "conversations" in rec and "messages" in rec:
        raise QigError(f"{where} (id {rec.get('id', '?')}) has both 'conversations' and 'messages'; give one")
    if "text" in rec and "conversations" not in rec and "messages" not in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise QigError(f"{where}: 'text' must be a non-empty string")
        _check_unicode(rec["text"], f"{where}: 'text'")
        return
    names = _image_names(rec, where)
    if "messages" in rec:
        inline = _check_messages(rec, where)
        if inline and (names is not None or images_given):
            raise QigError(
                f"{where} (id {rec.get('id', '?')}): images given both inline ({{'type': 'image', 'image': path}}) "
                "and as the record's images; give them one way"
            )
        names = names or inline
    else:
        _check_conversations(rec, where)
    for name in names or []:
        if isinstance(name, str):
            _check_unicode(name, f"{where}: image {name!r}")


def _check_conversations(rec: dict, where: str) -> None:
    conv = rec.get("conversations")
    ok_turns = isinstance(conv, list) and all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and isinstance(t.get("from"), str) for t in conv
    )
    if not ok_turns or len(conv) < 2:
        raise QigError(
            f"{where} (id {rec.get('id', '?')}) needs 'conversations': a list of at least two "
            f"{{'from': 'human'|'gpt', 'value': str}} turns (or a plain {{'text': str}})"
        )
    for j, turn in enumerate(conv):
        if turn["from"] not in ROLE_OF:
            raise QigError(
                f"{where} (id {rec.get('id', '?')}): turn {j} is from {turn['from']!r}; allowed: {', '.join(ROLE_OF)}"
            )
    if ROLE_OF[conv[-1]["from"]] != "assistant":
        raise QigError(f"{where} (id {rec.get('id', '?')}): the last turn must be the answer ('from': 'gpt')")
    for j, turn in enumerate(conv):
        _check_unicode(turn["value"], f"{where}: turn {j}'s 'value'")


def _check_messages(rec: dict, where: str) -> list[str]:
    """Check an OpenAI-style ``messages`` list; returns the inline image paths, in order."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        raise QigError(
            f"{where} (id {rec.get('id', '?')}) needs 'messages': a list of at least two "
            "{'role': 'user'|'assistant'|'system', 'content': str | [items]} messages"
        )
    inline: list[str] = []
    bare = 0  # image items without a path of their own
    for j, msg in enumerate(msgs):
        role = msg.get("role")
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise QigError(
                f"{where} (id {rec.get('id', '?')}): message {j} has role {role!r}; allowed: {', '.join(MESSAGE_ROLES)}"
            )
        content = msg.get("content")
        if isinstance(content, str):
            _check_unicode(content, f"{where}: message {j}'s 'content'")
            continue
        if not isinstance(content, list):
            raise QigError(
                f"{where} (id {rec.get('id', '?')}): message {j}'s 'content' is a {type(content).__name__}; "
                "expected a string or a list of {'type': 'text', 'text': str} / {'type': 'image'} items"
            )
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                _check_unicode(item["text"], f"{where}: message {j}'s text")
            elif kind == "image":
                path = inline_image(item, f"{where} (id {rec.get('id', '?')}): message {j}")
                if path is None:
                    bare += 1
                else:
                    inline.append(path)
            else:
                raise QigError(
                    f"{where} (id {rec.get('id', '?')}): message {j} holds the content item {_short(item)}; "
                    "allowed: {'type': 'text', 'text': str}, {'type': 'image'} (optionally with 'image': path)"
                )
    if msgs[-1]["role"] != "assistant":
        raise QigError(f"{where} (id {rec.get('id', '?')}): the last message must be the answer ('role': 'assistant')")
    if inline and bare:
        raise QigError(
            f"{where} (id {rec.get('id', '?')}): {len(inline)} image item(s) with a path and {bare} without; "
            "give every image inline, or none (then the record's 'images' are used in order)"
        )
    return inline


def inline_image(item: dict, where: str):
    """The path an image content item carries (None: it has none), e.g. ``{"type": "image", "image": "x.png"}``."""
    given = [item[k] for k in INLINE_IMAGE_KEYS if item.get(k) is not None]
    if any(item.get(k) is not None for k in ("url", "image_url")):
        raise QigError(f"{where}: images are read from local files; give {{'type': 'image', 'image': 'path'}}")
    if len(given) > 1:
        raise QigError(f"{where}: an image item gives both 'image' and 'path'; give one")
    if given and not isinstance(given[0], str | dict | bytes):
        raise QigError(f"{where}: an image item's 'image' is a {type(given[0]).__name__}; expected a path")
    return given[0] if given else None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _image_names(rec: dict, where: str) -> list[str] | None:
    """The record's image paths (``image`` or ``images``: a path or a list of them); None: none given."""
    keys = [k for k in IMAGE_KEYS if rec.get(k) is not None]
    if len(keys) > 1:
        raise QigError(f"{where} (id {rec.get('id', '?')}) has both 'image' and 'images'; give one")
    if not keys:
        return None
    names = rec[keys[0]]
    if not (isinstance(names, str) or (isinstance(names, list) and all(isinstance(x, str) for x in names))):
        raise QigError(f"{where} (id {rec.get('id', '?')}): '{keys[0]}' must be a path or a list of paths")
    return [names] if isinstance(names, str) else names


def _check_unicode(text: str, what: str) -> None:
    """Refuse lone surrogates (JSON can escape them, "\\ud800"): no tokenizer or file system takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise QigError(
            f"{what} holds {bad!r}, half of a UTF-16 surrogate pair, not text; fix the file's encoding"
        ) from None


def image_refs(rec: dict) -> list | None:
    """A checked record's images as given (paths, or a table's image cells); None: a text record.

    The record's ``image`` / ``images``, else the image paths inline in its
    ``messages`` content, in order.
    """
    for key in IMAGE_KEYS:
        if rec.get(key) is not None:
            return [rec[key]] if isinstance(rec[key], str) else list(rec[key])
    inline = [
        ref
        for msg in rec.get("messages") or []
        if isinstance(msg.get("content"), list)
        for item in msg["content"]
        if item.get("type") == "image" and (ref := inline_image(item, "")) is not None
    ]
    return inline or None


def load_images(rec: dict, i: int, folder: Path, path: Path):
    """The record's images as RGB PIL images (None for a text record); a file that is not one is refused."""
    refs = image_refs(rec)
    if refs is None:
        return None
    return [open_image(ref, folder, f"sample {rec.get('id', i)} of {path}") for ref in refs]


def open_image(ref, folder: Path, where: str):
    """One image as RGB PIL: a path under ``folder``, bytes, a ``{"bytes", "path"}`` dict (datasets), or a PIL image.

    where: names the sample in the error ("sample x of data.json").
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):  # datasets' Image feature as stored: the file's bytes, or only its path
        if ref.get("bytes") is not None:
            ref = ref["bytes"]
        elif ref.get("path") is not None:
            ref = ref["path"]
        else:
            raise QigError(f"{where}: an image with neither bytes nor a path")
    if isinstance(ref, bytes | bytearray | memoryview):
        source, what = io.BytesIO(bytes(ref)), f"({len(ref)} bytes)"
    elif isinstance(ref, str):
        source = what = folder / ref
    else:
        raise QigError(f"{where}: an image given as a {type(ref).__name__}; expected a path, bytes or an image")
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise QigError(f"{where}: image {what} does not exist (image folder: {folder})") from exc
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # ValueError: a name with a NUL byte; DecompressionBombError: a header claiming a gigapixel image
        raise QigError(f"{where}: cannot read image {what}: {exc}") from exc
