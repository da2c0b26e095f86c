"""Calibration formats: a datasets folder, parquet and OpenAI-style messages JSONL give what LLaVA JSON gives.

Every format is built from the same embedded records as the LLaVA JSON split
and must calibrate to the same input_ids, roles and pixels; multi-turn
conversations get answer roles on every reply; bad rows get one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import processor, tiny_llava
from PIL import Image

from qig.calib import (
    ANSWER,
    PROMPT,
    VISION,
    answer_span,
    calibration_for,
    chat_texts,
    check_calibration_file,
    load_calibration,
)
from qig.calib.render import chat_messages
from qig.embedded import world
from qig.errors import QigError

N = 6


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "split"
    return world.write_split("calib", out, n=N, seed=0)


def _records(split: Path) -> list[dict]:
    return json.loads(split.read_text())


def _question(rec: dict) -> str:
    return rec["conversations"][0]["value"].replace("<image>", "").strip()


def _answer(rec: dict) -> str:
    return rec["conversations"][1]["value"]


def _datasets():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def _pil(split: Path, rec: dict) -> Image.Image:
    with Image.open(split.parent / rec["image"]) as im:
        return im.copy()


# ------------------------------------------------------------- one builder per format (from the LLaVA records)


def _datasets_folder(split: Path, out: Path) -> Path:
    recs = _records(split)
    ds = _datasets().Dataset.from_dict(
        {
            "id": [r["id"] for r in recs],
            "image": [_pil(split, r) for r in recs],
            "conversations": [r["conversations"] for r in recs],
        }
    )
    ds.save_to_disk(str(out / "ds"))
    return out / "ds"


def _datasets_dict_folder(split: Path, out: Path) -> Path:
    """A DatasetDict with one split (``load_dataset(...).save_to_disk``): that split is used."""
    recs = _records(split)
    messages = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _question(r)}]},
            {"role": "assistant", "content": [{"type": "text", "text": _answer(r)}]},
        ]
        for r in recs
    ]
    ds = _datasets().Dataset.from_dict(
        {"id": [r["id"] for r in recs], "images": [[_pil(split, r)] for r in recs], "messages": messages}
    )
    _datasets().DatasetDict({"train": ds}).save_to_disk(str(out / "dsd"))
    return out / "dsd"


def _parquet(split: Path, out: Path) -> Path:
    """What ``Dataset.to_parquet`` writes: the images as {"bytes", "path"} structs."""
    _datasets_folder(split, out)
    _datasets().load_from_disk(str(out / "ds")).to_parquet(str(out / "data.parquet"))
    return out / "data.parquet"


def _parquet_captions_by_path(split: Path, out: Path) -> Path:
    """Plain pyarrow: image paths relative to the image folder (the split's folder) and a caption column."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = _records(split)
    table = pa.table(
        {"id": [r["id"] for r in recs], "image": [r["image"] for r in recs], "caption": [_answer(r) for r in recs]}
    )
    path = split.parent / "captions.parquet"  # beside images/, the default image folder
    pq.write_table(table, path)
    return path


def _messages_jsonl(split: Path, out: Path) -> Path:
    rows = [
        {
            "id": r["id"],
            "messages": [{"role": "user", "content": _question(r)}, {"role": "assistant", "content": _answer(r)}],
            "images": [r["image"]],
        }
        for r in _records(split)
    ]
    path = split.parent / "messages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _messages_inline_jsonl(split: Path, out: Path) -> Path:
    rows = [
        {
            "id": r["id"],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": r["image"]}, {"type": "text", "text": _question(r)}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": _answer(r)}]},
            ],
        }
        for r in _records(split)
    ]
    path = split.parent / "inline.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


FORMATS = {
    "datasets-folder": _datasets_folder,
    "datasets-dict-messages": _datasets_dict_folder,
    "parquet": _parquet,
    "parquet-paths-captions": _parquet_captions_by_path,
    "messages-jsonl": _messages_jsonl,
    "messages-jsonl-inline-images": _messages_inline_jsonl,
}


def _same(a, b) -> None:
    assert [s.id for s in a.samples] == [s.id for s in b.samples]
    for x, y in zip(a.samples, b.samples, strict=True):
        assert torch.equal(x.inputs["input_ids"], y.inputs["input_ids"]), x.id
        assert torch.equal(x.roles, y.roles), x.id
        assert torch.equal(x.inputs["pixel_values"], y.inputs["pixel_values"]), x.id


@pytest.mark.parametrize("build", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_calibrates_as_the_llava_json(split, tmp_path, build):
    path = build(split, tmp_path)
    llava = load_calibration(split, processor(), n_samples=N, seed=3, image_seq_length=36)
    _same(load_calibration(path, processor(), n_samples=N, seed=3, image_seq_length=36), llava)
    model = tiny_llava()
    _same(
        calibration_for(model, processor(), path, n_samples=4, seed=1),
        calibration_for(model, processor(), split, n_samples=4, seed=1),
    )


def test_single_turn_answer_is_the_last_reply_as_before(split):
    """Single-turn records: the answer is the span ``chat_texts`` + ``answer_span`` give (the rule before)."""
    proc = processor()
    calib = load_calibration(split, proc, n_samples=N, image_seq_length=36)
    records = {r["id"]: r for r in _records(split)}
    for s in calib.samples:
        full, prompt = chat_texts(proc, chat_messages(records[s.id], s.id, 1))
        image = _pil(split, records[s.id])
        ids = proc(text=[full], images=[image], return_tensors="pt")["input_ids"][0]
        prompt_ids = proc(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
        start, end = answer_span(ids, prompt_ids, proc.tokenizer.eos_token_id, s.id)
        expected = torch.full_like(ids, PROMPT, dtype=torch.int8)
        expected[start:end] = ANSWER
        expected[ids == proc.image_token_id] = VISION
        assert torch.equal(s.roles, expected)


# ------------------------------------------------------------- multi-turn

MULTI = [
    {"from": "human", "value": "<image>\nhow many objects are there ?"},
    {"from": "gpt", "value": "two"},
    {"from": "human", "value": "what colour is the digit ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "is there a circle ?"},
    {"from": "gpt", "value": "yes"},
]


def _answers(calib, tok=None) -> list[list[str]]:
    """Per sample, the decoded runs of answer tokens."""
    tok = tok or processor().tokenizer
    out = []
    for s in calib.samples:
        ids, runs, run = s.inputs["input_ids"][0], [], []
        for t, role in enumerate(s.roles.tolist()):
            if role == ANSWER:
                run.append(int(ids[t]))
            elif run:
                runs, run = [*runs, run], []
        out.append([tok.decode(r) for r in [*runs, run] if r])
    return out


def _as_messages(turns: list[dict]) -> list[dict]:
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in turns]


def test_every_reply_of_a_multi_turn_conversation_is_answer(split, tmp_path):
    rec = dict(_records(split)[0], conversations=MULTI)
    llava = tmp_path / "multi.json"
    llava.write_text(json.dumps([rec]))
    messages = tmp_path / "multi.jsonl"
    messages.write_text(json.dumps({"id": rec["id"], "messages": _as_messages(MULTI), "images": [rec["image"]]}))
    expected = [["two<|im_end|>", "red<|im_end|>", "yes<|im_end|>"]]
    for path in (llava, messages):
        calib = load_calibration(path, processor(), image_folder=split.parent, n_samples=1, image_seq_length=36)
        assert [[a.replace(" ", "") for a in runs] for runs in _answers(calib)] == expected
        assert int((calib.samples[0].roles == VISION).sum()) == 36


def test_images_in_later_turns_and_a_leading_reply(split, tmp_path):
    """The second image sits in the third turn: each reply's prompt is encoded with the images before it."""
    recs = _records(split)
    turns = [
        {"from": "gpt", "value": "yes"},  # opens the conversation: it answers nothing, so it stays prompt
        {"from": "human", "value": "<image>\nhow many objects are there ?"},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "<image>\nhow many digits are there ?"},
        {"from": "gpt", "value": "3"},
    ]
    path = tmp_path / "two.json"
    path.write_text(json.dumps([{"id": "two", "image": [recs[0]["image"], recs[1]["image"]], "conversations": turns}]))
    calib = load_calibration(path, processor(), image_folder=split.parent, n_samples=1, image_seq_length=36)
    assert [[a.replace(" ", "") for a in runs] for runs in _answers(calib)] == [["two<|im_end|>", "3<|im_end|>"]]
    assert int((calib.samples[0].roles == VISION).sum()) == 72


def test_a_template_without_end_tokens_ends_each_reply_at_its_turn(split, tmp_path):
    """No end token closes a turn: an earlier reply ends where the conversation rendered up to it ends."""
    from qig.calib import from_records
    from qig.embedded import build_processor

    proc = build_processor()
    proc.chat_template = proc.chat_template.replace("<|im_end|>", "")
    image = _pil(split, _records(split)[0])
    calib = from_records([(image, {"id": "x", "conversations": MULTI})], proc, image_seq_length=36)
    runs = [a.replace(" ", "") for a in _answers(calib, proc.tokenizer)[0]]
    assert runs[0].startswith("two") and runs[1].startswith("red") and runs[2] == "yes"
    assert "colour" not in "".join(runs) and "circle" not in "".join(runs)  # no user text counted as answer


# ------------------------------------------------------------- bad rows: one-line errors, whatever the format


def _turns(answer_role="gpt", first_role="human", **rec):
    return {
        **rec,
        "conversations": [{"from": first_role, "value": "<image>\nq"}, {"from": answer_role, "value": "a"}],
    }


def _msgs(content="q", answer_role="assistant", user_role="user", **rec):
    return {**rec, "messages": [{"role": user_role, "content": content}, {"role": answer_role, "content": "two"}]}


def _jsonl(tmp_path, rows) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


JSON_BAD = {
    "llava-missing-image": (_turns(id="a", image="nope.png"), r"sample a of .*nope.png does not exist"),
    "llava-no-reply": (_turns("human", id="a", image="images/calib-000000.png"), "the last turn must be the answer"),
    "llava-unknown-role": (_turns(first_role="bot", id="a"), r"turn 0 is from 'bot'; allowed: human, user, gpt"),
    "messages-missing-image": (_msgs(id="m", images=["nope.png"]), r"sample m of .*nope.png does not exist"),
    "messages-inline-missing-image": (
        _msgs([{"type": "image", "image": "nope.png"}, {"type": "text", "text": "q"}], id="m"),
        "nope.png does not exist",
    ),
    "messages-no-reply": (_msgs(answer_role="user", id="m"), r"the last message must be the answer \('role'"),
    "messages-unknown-role": (_msgs(user_role="tool", id="m"), "message 0 has role 'tool'; allowed: user, assistant"),
    "messages-content-not-text": (_msgs(3, id="m"), "message 0's 'content' is a int; expected a string or a list"),
    "messages-unknown-item": (_msgs([{"type": "video"}], id="m"), "content item {'type': 'video'}; allowed"),
    "messages-text-not-a-string": (_msgs([{"type": "text", "text": 1}], id="m"), "content item"),
    "messages-images-twice": (
        _msgs([{"type": "image", "image": "a.png"}], id="m", images=["a.png"]),
        "images given both inline",
    ),
    "messages-url-image": (_msgs([{"type": "image", "url": "http://x/a.png"}], id="m"), "read from local files"),
    "messages-one-message": ({"id": "m", "messages": [{"role": "assistant", "content": "a"}]}, "at least two"),
    "messages-too-many-images": (_msgs("<image> q", id="m", images=["images/calib-000000.png"] * 2), "placeholder"),
}


@pytest.mark.parametrize(("row", "message"), JSON_BAD.values(), ids=JSON_BAD.keys())
def test_bad_json_rows_get_one_line_errors(split, tmp_path, row, message):
    path = _jsonl(tmp_path, [row])
    with pytest.raises(QigError, match=message) as err:
        load_calibration(path, processor(), image_folder=split.parent, n_samples=1, image_seq_length=36)
    assert "\n" not in str(err.value)


def _table(tmp_path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table(columns), path)
    return path


_CONV = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
TABLE_BAD = {
    "missing-image-path": (
        {"id": ["p"], "image": ["nope.png"], "caption": ["two"]},
        r"sample p of .*nope.png does not",
    ),
    "caption-without-image": ({"id": ["p"], "image": [None], "caption": ["two"]}, "a caption needs its image"),
    "no-reply": (
        {"image": ["images/calib-000000.png"], "conversations": [[_CONV[0], dict(_CONV[0])]]},
        "the last turn must be the answer",
    ),
    "unknown-role": (
        {"image": ["images/calib-000000.png"], "conversations": [[dict(_CONV[0], **{"from": "bot"}), _CONV[1]]]},
        "turn 0 is from 'bot'",
    ),
    "conversations-as-text": ({"image": ["images/calib-000000.png"], "conversations": ["hi"]}, "needs 'conversations'"),
    "image-column-of-numbers": ({"image": [3], "caption": ["two"]}, "column 'image' is of type int64"),
    "empty-caption": ({"image": ["images/calib-000000.png"], "caption": [""]}, "a caption is a non-empty string"),
    "no-usable-column": ({"picture": ["a.png"], "answer": ["two"]}, r"its columns: picture, answer\); it needs"),
    "caption-without-image-column": ({"caption": ["two"]}, "its columns: caption"),
}


@pytest.mark.parametrize(("columns", "message"), TABLE_BAD.values(), ids=TABLE_BAD.keys())
def test_bad_table_rows_get_one_line_errors(split, tmp_path, columns, message):
    path = _table(tmp_path, columns)
    with pytest.raises(QigError, match=message) as err:
        load_calibration(path, processor(), image_folder=split.parent, n_samples=1, image_seq_length=36)
    assert "\n" not in str(err.value)


def test_text_column_alone_is_text_samples(tmp_path):
    calib = load_calibration(_table(tmp_path, {"text": ["two objects .", "a red circle ."]}), processor(), n_samples=2)
    assert all(set(s.roles.tolist()) == {ANSWER} for s in calib.samples)


def test_bad_datasets_folders(split, tmp_path):
    datasets = _datasets()
    not_a_dataset = tmp_path / "plain"
    not_a_dataset.mkdir()
    with pytest.raises(QigError, match="is a folder but not a datasets folder"):
        load_calibration(not_a_dataset, processor())
    ds = datasets.Dataset.from_dict({"text": ["two"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two-splits"))
    with pytest.raises(QigError, match=r"holds the splits train, test; give one split's folder, e.g. .*train"):
        load_calibration(tmp_path / "two-splits", processor())
    folder = _datasets_folder(split, tmp_path)
    check_calibration_file(folder, n_samples=2)  # reads the records and the chosen rows' images, no model


def test_missing_extra_is_refused_with_the_install_line(split, tmp_path, monkeypatch):
    import importlib

    path = _parquet_captions_by_path(split, tmp_path)
    real = importlib.import_module

    def without_the_extra(name, *args):
        if name.split(".")[0] in ("pyarrow", "datasets"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_the_extra)
    with pytest.raises(QigError, match=r"needs the optional package pyarrow.parquet: pip install 'qig\[data\]'"):
        load_calibration(path, processor())
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    with pytest.raises(QigError, match=r"datasets folder .* needs the optional package datasets: pip install"):
        load_calibration(folder, processor())
