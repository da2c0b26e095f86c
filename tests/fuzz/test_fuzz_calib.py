"""Fuzzing ``qig.calib``: any calibration file, any images, ends in a CalibrationSet or a QigError.

Records are drawn from three pools: nearly valid LLaVA records and nearly
valid OpenAI-style ``messages`` records (the right keys, odd values: roles,
placeholders per image, content items, inline images, empty or huge strings,
unicode), and anything JSON can hold. They are written as a JSON list, JSONL,
or a parquet table (columns from the records' keys, images sometimes as the
``{"bytes", "path"}`` structs ``datasets`` writes). Images are real PNGs of
several modes and sizes, truncated PNGs, text, empty files, a PNG header
claiming a gigapixel, missing files and folders.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from _fuzz import ends_well, fast_and_slow, json_values, odd_text
from _tiny import processor, tiny_llava
from hypothesis import strategies as st
from PIL import Image

from qig.calib import (
    VISION,
    CalibrationSet,
    calibration_for,
    check_calibration_file,
    load_calibration,
    read_records,
)
from qig.embedded import IMAGE_TOKEN

IMAGE_SEQ_LENGTH = 36  # the embedded processor's image tokens per image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gigapixel_header() -> bytes:
    """A PNG that says it is 60000 x 60000 (PIL refuses it as a decompression bomb on open)."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


GOOD = _png(Image.new("RGB", (48, 48), (200, 30, 30)))
IMAGE_FILES: dict[str, bytes | None] = {  # None: a folder of that name
    "good.png": GOOD,
    "tiny.png": _png(Image.new("RGB", (1, 1))),
    "wide.png": _png(Image.new("RGB", (300, 2))),
    "gray16.png": _png(Image.new("I;16", (20, 20))),
    "palette.png": _png(Image.new("P", (20, 20))),
    "rgba.png": _png(Image.new("RGBA", (20, 20))),
    "truncated.png": GOOD[: len(GOOD) // 2],
    "header-only.png": GOOD[:40],
    "text.png": b"this is not an image\n",
    "empty.png": b"",
    "gigapixel.png": _gigapixel_header(),
    "folder.png": None,
}
IMAGE_NAMES = [*IMAGE_FILES, "missing.png", "", ".", "sub/../good.png", "a\x00b.png", "\ud800.png", "x" * 300]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with every kind of image file, and a subfolder ``sub``."""
    root = tmp_path_factory.mktemp("fuzz-calib")
    (root / "sub").mkdir()
    for name, data in IMAGE_FILES.items():
        if data is None:
            (root / name).mkdir()
        else:
            (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------- strategies

ROLES = ["human", "gpt", "user", "assistant", "system"]
roles = st.sampled_from(ROLES * 6 + ["bot", "", "GPT"])  # mostly known roles, so most records get rendered
image_names = st.sampled_from(IMAGE_NAMES)


@st.composite
def nearly_valid_records(draw) -> dict:
    """A LLaVA record with the right keys: n images, k placeholders (often k == n), odd turns and values."""
    n_images = draw(st.integers(0, 2))
    names = draw(
        st.lists(
            st.sampled_from(["good.png", "tiny.png", "wide.png", "rgba.png"]), min_size=n_images, max_size=n_images
        )
    )
    if draw(st.integers(0, 3)) == 0:
        names = draw(st.lists(image_names, max_size=3))
    k = draw(st.one_of(st.just(n_images), st.just(n_images), st.integers(0, 3)))
    question = IMAGE_TOKEN * k + draw(odd_text)
    turns = draw(st.lists(st.fixed_dictionaries({"from": roles, "value": odd_text}), max_size=2))
    turns.insert(draw(st.integers(0, len(turns))), {"from": draw(roles), "value": question})
    turns.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(odd_text)})
    rec: dict = {"id": draw(st.one_of(st.integers(), odd_text, json_values)), "conversations": turns}
    if names or draw(st.booleans()):
        rec["image"] = names[0] if len(names) == 1 and draw(st.booleans()) else names
    return rec


MESSAGE_ROLES = ["user", "assistant", "system"]
message_roles = st.sampled_from(MESSAGE_ROLES * 6 + ["tool", "", "USER", "human"])
GOOD_NAMES = ["good.png", "tiny.png", "wide.png", "rgba.png"]


@st.composite
def content_items(draw, n_images: int, inline: list[str] | None) -> list | str:
    """A message's content: a string with placeholders, or text / image items (some odd), images inline or not."""
    if inline is None and draw(st.booleans()):
        return IMAGE_TOKEN * n_images + draw(odd_text)
    items: list = [
        {"type": "image", "image": name} if inline is not None else {"type": "image"}
        for name in (inline if inline is not None else [None] * n_images)
    ]
    items.insert(draw(st.integers(0, len(items))), {"type": "text", "text": draw(odd_text)})
    if draw(st.integers(0, 5)) == 0:
        odd_item = st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image", "video", "image_url"])},
                optional={
                    "text": st.one_of(odd_text, json_values),
                    "image": st.one_of(image_names, json_values),
                    "url": st.just("http://x/a.png"),
                },
            ),
        )
        items.insert(draw(st.integers(0, len(items))), draw(odd_item))
    return items


@st.composite
def nearly_valid_messages(draw) -> dict:
    """An OpenAI-style record: images in 'images' or inline in content items, odd roles, content and turns."""
    n_images = draw(st.integers(0, 2))
    names = draw(st.lists(st.sampled_from(GOOD_NAMES), min_size=n_images, max_size=n_images))
    if draw(st.integers(0, 3)) == 0:
        names = draw(st.lists(image_names, max_size=3))
    inline = draw(st.booleans()) and bool(names)
    k = draw(st.one_of(st.just(len(names)), st.just(len(names)), st.integers(0, 3)))
    question = {"role": draw(message_roles), "content": draw(content_items(k, names if inline else None))}
    turns = draw(
        st.lists(
            st.fixed_dictionaries({"role": message_roles, "content": st.one_of(odd_text, content_items(0, None))}),
            max_size=3,
        )
    )
    turns.insert(draw(st.integers(0, len(turns))), question)
    turns.append({"role": draw(st.sampled_from(["assistant", "assistant", "user"])), "content": draw(odd_text)})
    rec: dict = {"id": draw(st.one_of(st.integers(), odd_text)), "messages": turns}
    if not inline and (names or draw(st.booleans())):
        rec[draw(st.sampled_from(["images", "images", "image"]))] = names
    return rec


turns = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"from": st.one_of(roles, json_values), "value": st.one_of(odd_text, json_values)}
    ),
    json_values,
)
any_records = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "image": st.one_of(image_names, st.lists(image_names, max_size=3), json_values),
            "conversations": st.one_of(st.lists(turns, max_size=4), json_values),
            "text": st.one_of(odd_text, json_values),
            "messages": st.one_of(st.lists(json_values, max_size=3), json_values),
            "images": st.one_of(st.lists(image_names, max_size=3), json_values),
        },
    ),
    st.builds(lambda t: {"text": t}, odd_text),
    json_values,
)
records = st.one_of(nearly_valid_records(), nearly_valid_messages(), any_records)


@st.composite
def calibration_files(draw) -> tuple[str, bytes | None]:
    """(file name, content); content None: the name is a folder. JSON list, JSONL, or garbage."""
    pool = draw(st.sampled_from([nearly_valid_records(), nearly_valid_messages(), nearly_valid_records(), records]))
    recs = draw(st.lists(pool, min_size=1, max_size=4))
    forms = ["json", "jsonl", "jsonl-blank-lines", "value", "bytes", "truncated", "folder", "parquet", "parquet"]
    form = draw(st.sampled_from(forms))
    if form == "parquet":
        table = _parquet(recs, as_bytes=draw(st.booleans()), captions=draw(st.integers(0, 3)) == 0)
        if table is not None:
            return "data.parquet", table
        form = "json"  # arrow cannot hold these records in one table (mixed types): write them as JSON
    if form == "json":
        return "data.json", json.dumps(recs).encode("utf-8", "surrogatepass")
    if form.startswith("jsonl"):
        sep = "\n\n  \n" if form == "jsonl-blank-lines" else "\n"
        return "data.jsonl", sep.join(json.dumps(r) for r in recs).encode("utf-8", "surrogatepass")
    if form == "value":
        return "data.json", json.dumps(draw(json_values)).encode("utf-8", "surrogatepass")
    if form == "truncated":
        text = json.dumps(recs).encode()
        return "data.json", text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if form == "bytes":
        return "data.json", draw(st.binary(max_size=64))
    return "data.json", None


def _parquet(recs: list, as_bytes: bool, captions: bool) -> bytes | None:
    """The records as a parquet table, one column per key (None: arrow cannot type them, or no pyarrow).

    Made typable as a ``datasets`` table would be: ids as strings, string content as one text item.
    as_bytes: image names become {"bytes", "path"} structs holding the file's bytes, as datasets stores images.
    captions: LLaVA records become (image, caption) rows, the caption their last turn.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None

    def embed(name):
        return {"bytes": IMAGE_FILES.get(name) or b"", "path": None} if isinstance(name, str) else name

    def row(r: dict) -> dict:
        r = dict(r)  # a copy: the records may still be written as JSON
        if "id" in r:
            r["id"] = str(r["id"])
        if isinstance(r.get("messages"), list):
            r["messages"] = [
                dict(m, content=[{"type": "text", "text": m["content"]}])
                if isinstance(m, dict) and isinstance(m.get("content"), str)
                else m
                for m in r["messages"]
            ]
        if captions and isinstance(r.get("conversations"), list) and r["conversations"]:
            last = r["conversations"][-1]
            r = {"image": r.get("image"), "caption": last.get("value") if isinstance(last, dict) else last}
        if as_bytes:
            for key in ("image", "images"):
                if isinstance(r.get(key), str):
                    r[key] = embed(r[key])
                elif isinstance(r.get(key), list):
                    r[key] = [embed(x) for x in r[key]]
        return r

    rows = [row(r) for r in recs if isinstance(r, dict)]
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):  # mixed types, lone surrogates, huge ints
        return None
    return buf.getvalue().to_pybytes()


def _write(folder: Path, name: str, content: bytes | None) -> Path:
    work = folder / "work"
    if work.exists():
        for p in sorted(work.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    else:
        work.mkdir()
    path = work / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def _check_set(calib: CalibrationSet, n_samples: int, max_length: int) -> None:
    """What a returned set promises: at most n samples, lengths within the cap, 36 image tokens per image."""
    assert 1 <= len(calib) <= n_samples
    for s in calib.samples:
        T = s.roles.numel()
        assert 0 < T <= max_length
        assert s.inputs["input_ids"].shape == (1, T)
        assert int((s.roles == VISION).sum()) % IMAGE_SEQ_LENGTH == 0
    for batch in ends_well(lambda: list(calib.batches(2))) or []:  # text-only and image samples: refused
        assert batch.roles.shape == batch.inputs["input_ids"].shape == (len(batch.ids), calib.seq_len)
        assert batch.roles.dtype == torch.int8


# ---------------------------------------------------------------- properties


def read_records_ends_in_records_or_an_error(folder, file):
    """read_records: a list of (index, record) whose records passed the schema check, or a QigError."""
    path = _write(folder, *file)
    out = ends_well(read_records, path)
    if out is not None:
        assert out and all(isinstance(rec, dict) for _, rec in out)
        assert [i for i, _ in out] == list(range(len(out)))


def load_calibration_ends_in_a_set_or_an_error(folder, file, n_samples, max_length, image_folder, seed):
    """load_calibration with the embedded processor: a CalibrationSet keeping its promises, or a QigError.

    check_calibration_file (the check before a model is loaded) refuses nothing load_calibration reads.
    """
    path = _write(folder, *file)
    images = {"default": None, "folder": folder, "missing": folder / "nope", "file": folder / "good.png"}[image_folder]
    checked = ends_well(lambda: check_calibration_file(path, images, n_samples=n_samples, seed=seed) or True)
    calib = ends_well(
        load_calibration,
        path,
        processor(),
        image_folder=images,
        n_samples=n_samples,
        seed=seed,
        max_length=max_length,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )
    if calib is not None:
        assert checked, "check_calibration_file refused a file load_calibration reads"
        _check_set(calib, n_samples, max_length)


def _records_file(*recs) -> tuple[str, bytes]:
    return "data.json", json.dumps(list(recs)).encode()


def _turns(question: str = "q", answer: str = "a", **rec) -> dict:
    return {**rec, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# Inputs that once escaped as another exception (kept as examples, always tried first).
FOUND = {
    "unhashable role": _records_file({"conversations": [{"from": [], "value": ""}, {"from": "gpt", "value": ""}]}),
    "deep nesting": ("data.json", b"[" * 100_000 + b"]" * 100_000),
    "a 5000-digit integer": ("data.jsonl", b'{"text": "a", "id": ' + b"1" * 5000 + b"}"),
    "NUL in an image name": _records_file(_turns(image="a\x00b.png")),
    "lone surrogate in an image name": _records_file(_turns(image="\ud800.png")),
    "lone surrogate in a turn": _records_file(_turns(question="\ud800")),
    "lone surrogate in a text record": _records_file({"text": "\ud800"}),
    "gigapixel image": _records_file(_turns("<image>", image="gigapixel.png")),
    "text-only and image sample in one batch": _records_file(
        _turns(id=0, image="good.png"), _turns(id=1), _turns(id=2, image="good.png")
    ),
}

test_read_records, test_read_records_slow = fast_and_slow(
    file=calibration_files(), examples=tuple({"file": f} for f in FOUND.values())
)(read_records_ends_in_records_or_an_error)

_load_args = {
    "file": calibration_files(),
    "n_samples": st.one_of(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, -1, True, 2.0, "2", None])),
    "max_length": st.one_of(
        st.integers(40, 400), st.integers(1, 120), st.sampled_from([1024, 0, -2, 2.5, "64", None, False])
    ),
    "image_folder": st.sampled_from(["default", "folder", "missing", "file"]),
    "seed": st.integers(-(2**40), 2**40),
}
_found_load = [
    {"file": f, "n_samples": 3, "max_length": 1024, "image_folder": "folder", "seed": 0} for f in FOUND.values()
]
_found_load += [  # a length cap that is not a positive integer
    {"file": _records_file({"text": "hello"}), "n_samples": 1, "max_length": m, "image_folder": "default", "seed": 0}
    for m in (0, -3, 2.5, None)
]
test_load_calibration, test_load_calibration_slow = fast_and_slow(**_load_args, examples=tuple(_found_load))(
    load_calibration_ends_in_a_set_or_an_error
)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llava()


def calibration_for_ends_in_a_set_or_an_error(folder, tiny_model, file, n_samples, max_length):
    """calibration_for (the CLI's entry): the model's family picks the image token; a set or a QigError."""
    path = _write(folder, *file)
    calib = ends_well(
        calibration_for, tiny_model, processor(), path, image_folder=folder, n_samples=n_samples, max_length=max_length
    )
    if calib is not None:
        _check_set(calib, n_samples, max_length)


test_calibration_for, test_calibration_for_slow = fast_and_slow(
    file=calibration_files(), n_samples=st.integers(1, 3), max_length=st.integers(1, 200)
)(calibration_for_ends_in_a_set_or_an_error)
