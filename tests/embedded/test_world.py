import hashlib
import json

import numpy as np
import pytest

from qig.embedded import world
from qig.errors import QigError


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("split", ["train", "calib", "eval"])
def test_same_seed_same_bytes(tmp_path, split):
    a = world.write_split(split, tmp_path / "a", n=12, seed=5).parent
    b = world.write_split(split, tmp_path / "b", n=12, seed=5).parent
    c = world.write_split(split, tmp_path / "c", n=12, seed=6).parent
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_json_schema_and_images(tmp_path):
    path = world.write_split("eval", tmp_path / "e", n=40, seed=1)
    data = json.loads(path.read_text())
    assert len(data) == 40
    for rec in data:
        assert set(rec) == {"id", "image", "conversations", "type"}
        assert (path.parent / rec["image"]).is_file()
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert rec["type"] in world.QUESTION_TYPES


def test_calib_split_holds_captions_naming_every_object():
    for image, rec in world.generate("calib", 20, seed=3):
        assert rec["type"] == "caption"
        assert rec["conversations"][0]["value"] == "<image>\n" + world.CAPTION_PROMPT
        assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, "train")
    text = world.caption(scene)
    assert all(o.phrase in text for o in scene.objects)
    assert text.startswith(f"{len(scene.objects)} objects")


def test_eval_digits_never_seen_in_training():
    rng = np.random.default_rng(0)
    train_idx = {
        o.digit_index for _ in range(300) for o in world.sample_scene(rng, "train").objects if o.kind == "digit"
    }
    eval_idx = {o.digit_index for _ in range(300) for o in world.sample_scene(rng, "eval").objects if o.kind == "digit"}
    assert train_idx and eval_idx
    assert max(train_idx) < world.N_DIGITS_TRAIN <= min(eval_idx)


def test_question_types_balanced_and_answers_correct():
    recs = world.generate("eval", 400, seed=world.DEFAULT_EVAL_SEED)
    types = [r["type"] for _, r in recs]
    for t in world.QUESTION_TYPES:
        assert types.count(t) > 400 / len(world.QUESTION_TYPES) / 2, t
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene, q, a, t = world.sample_qa(rng, "train", "sum")
        digits = [int(o.name) for o in scene.objects if o.kind == "digit"]
        assert len(digits) == 2 and a == str(sum(digits))


def test_unknown_split_and_existing_output_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        world.generate("test", 1, 0)
    world.write_split("eval", tmp_path / "x", n=2, seed=0)
    with pytest.raises(QigError, match="overwrite"):
        world.write_split("eval", tmp_path / "x", n=2, seed=0)
