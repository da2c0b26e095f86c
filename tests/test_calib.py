"""Calibration data: roles through the chat template, file formats, and clear errors."""

import json

import pytest
from _tiny import processor

from qig.calib import (
    ANSWER,
    PAD,
    PROMPT,
    VISION,
    calibration_for,
    embedded_calibration,
    from_records,
    load_calibration,
)
from qig.embedded import world
from qig.errors import QigError


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "split"
    world.write_split("calib", out, n=6, seed=0)
    return out / "data.json"


def test_roles_of_an_embedded_sample():
    calib = embedded_calibration(processor(), n_samples=3, image_seq_length=36)
    tok = processor().tokenizer
    batch = next(calib.batches(3))
    ids, roles = batch.inputs["input_ids"], batch.roles
    assert roles.shape == ids.shape == (3, calib.seq_len)
    for b in range(3):
        assert int((roles[b] == VISION).sum()) == 36
        answer = tok.decode(ids[b][roles[b] == ANSWER])
        caption = world.generate("calib", 3, world.DEFAULT_CALIB_SEED)[b][1]["conversations"][1]["value"]
        assert answer.replace(" ", "").startswith(caption.replace(" ", "")[:-1])
        assert tok.convert_ids_to_tokens(int(ids[b][roles[b] == ANSWER][-1])) == "<|im_end|>"
        assert (roles[b] == PROMPT).any()
        pad = roles[b] == PAD
        assert torch_equal(pad, batch.inputs["attention_mask"][b] == 0)


def torch_equal(a, b):
    return bool((a == b).all())


def test_json_and_jsonl_give_the_same_samples(split, tmp_path):
    records = json.loads(split.read_text())
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a = load_calibration(split, processor(), n_samples=4, seed=3)
    b = load_calibration(jsonl, processor(), image_folder=split.parent, n_samples=4, seed=3)
    assert [s.id for s in a.samples] == [s.id for s in b.samples]
    c = load_calibration(split, processor(), n_samples=4, seed=4)
    assert [s.id for s in a.samples] != [s.id for s in c.samples]  # the seed shuffles


def test_plain_text_jsonl_is_all_answer(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "a red circle at the center ."}\n{"text": "two objects"}\n')
    calib = load_calibration(path, processor(), n_samples=2)
    roles = calib.roles
    assert set(roles[0].tolist()) == {ANSWER}
    assert set(roles[1].tolist()) == {ANSWER, PAD}


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "holds no records"),
        ([{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}], "at least two"),
        ([{"id": "a", "conversations": "text"}], "needs 'conversations'"),
        ([["not", "a", "dict"]], "expected an object"),
        (
            [
                {
                    "id": "a",
                    "image": "nope.png",
                    "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
                }
            ],
            "sample a of .*nope.png does not exist",
        ),
        (
            [{"id": "b", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}],
            "placeholder",
        ),
    ],
    ids=["empty-list", "one-turn", "wrong-schema", "not-an-object", "missing-image", "placeholder-without-image"],
)
def test_bad_files_name_the_problem(tmp_path, records, message):
    with pytest.raises(QigError, match=message):
        load_calibration(_write(tmp_path, records), processor())


def test_empty_and_unreadable_files(tmp_path, split):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(QigError, match="empty"):
        load_calibration(empty, processor())
    with pytest.raises(QigError, match="does not exist"):
        load_calibration(tmp_path / "missing.json", processor())
    broken = tmp_path / "broken"
    broken.mkdir()
    records = json.loads(split.read_text())
    (broken / "images").mkdir()
    (broken / records[0]["image"]).write_bytes(b"not a png")
    with pytest.raises(QigError, match=f"sample {records[0]['id']} of .*: cannot read image"):
        load_calibration(_write(broken, records[:1]), processor())


def test_image_token_count_mismatch_names_the_sample(split):
    with pytest.raises(QigError, match=r"sample calib-0-\d+: 36 image tokens .* expects 35"):
        load_calibration(split, processor(), n_samples=2, image_seq_length=35)
    with pytest.raises(QigError, match="17 image tokens after rendering .cap 20. but the model expects 36"):
        load_calibration(split, processor(), n_samples=2, image_seq_length=36, max_length=20)


def test_n_samples_must_be_positive():
    with pytest.raises(QigError, match="positive"):
        embedded_calibration(processor(), n_samples=0)


def _ids(calib):
    return [s.inputs["input_ids"] for s in calib.samples]


def test_calibration_for_builds_what_the_family_says(split):
    import torch
    from _tiny import tiny_llava

    model = tiny_llava()
    embedded = calibration_for(model, processor(), "embedded", n_samples=3)
    same = embedded_calibration(processor(), n_samples=3, image_seq_length=36)
    assert all(torch.equal(a, b) for a, b in zip(_ids(embedded), _ids(same), strict=True))
    assert all(int((s.roles == VISION).sum()) == 36 for s in embedded.samples)
    from_file = calibration_for(model, processor(), split, n_samples=4, seed=3)
    assert [s.id for s in from_file.samples] == [
        s.id for s in load_calibration(split, processor(), n_samples=4, seed=3).samples
    ]
    with pytest.raises(QigError, match="image_folder goes with a calibration file"):
        calibration_for(model, processor(), "embedded", image_folder=split.parent)


def test_gemma3_vision_roles_are_where_the_model_puts_image_features():
    """Gemma 3's processor calls its begin-of-image marker the image token; the family names the soft tokens."""
    import torch
    from models._families import build

    from qig.models import family_for

    model, proc = build("gemma3")
    calib = calibration_for(model, proc, "embedded", n_samples=2)
    batch = next(calib.batches(2))
    assert [int(n) for n in (batch.roles == VISION).sum(1)] == [model.config.mm_tokens_per_image] * 2
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    first = family_for(model).decoder_layers(model)[0]
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch.inputs)
            embedded = model.get_input_embeddings()(batch.inputs["input_ids"])
    finally:
        handle.remove()
    filled = (seen["x"] != embedded).any(-1)  # [b, T] where the decoder's input is not the token's embedding
    assert torch.equal(filled, batch.roles == VISION)
    processor_default = from_records(world.generate("calib", 2, world.DEFAULT_CALIB_SEED), proc)
    assert not torch.equal(processor_default.roles == VISION, calib.roles == VISION)
