"""The qig model's generate_until on hand-made requests: qig eval's answers, no-image and two-image questions, stops."""

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms-eval]', docs/lmms-eval.md)")

from lmms_eval.api.instance import Instance  # noqa: E402

from qig.embedded import world  # noqa: E402
from qig.errors import QigError  # noqa: E402
from qig.evaluate import _question, generate_answers  # noqa: E402
from qig.lmms.model import QigModel  # noqa: E402

RECORDS = world.generate("eval", 6, seed=world.DEFAULT_EVAL_SEED)


@pytest.fixture(scope="module")
def model():
    lm = QigModel(batch_size=4)
    lm.task_dict = {"t": {"test": [{"images": [img]} for img, _ in RECORDS] + [{"images": []}, {"images": []}]}}
    return lm


def _request(doc_id: int, question: str, images=lambda doc: doc["images"], **gen) -> Instance:
    args = (question, {"max_new_tokens": 6, **gen}, images, doc_id, "t", "test")
    return Instance("generate_until", args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_one_image_questions_get_qig_evals_answers(model):
    requests = [_request(i, _question(rec)[0]) for i, (_, rec) in enumerate(RECORDS)]
    assert model.generate_until(requests) == generate_answers(model.model, model.processor, RECORDS, batch_size=4)


def test_questions_without_or_with_two_images_are_answered_one_by_one(model):
    two = lambda doc: [RECORDS[0][0], RECORDS[1][0]]  # noqa: E731
    requests = [_request(6, "how many shapes are there ?"), _request(7, "what colour is the circle ?", images=two)]
    answers = model.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_stop_strings_cut_the_answer(model):
    question = _question(RECORDS[0][1])[0]
    full = model.generate_until([_request(0, question)])[0]
    assert full and model.generate_until([_request(0, question, until=[full[:1]])]) == [""]


def test_unknown_model_args_are_refused():
    with pytest.raises(QigError, match="the qig model takes no pretraind; its model args are: pretrained"):
        QigModel(pretraind="out/x")


def test_likelihood_tasks_are_refused(model):
    with pytest.raises(QigError, match="generate_until tasks only"):
        model.loglikelihood([])


def test_the_decoder_read_from_disk_gives_the_same_answers(model):
    streamed = QigModel(batch_size=4, model_offload="disk")
    streamed.task_dict = model.task_dict
    requests = [_request(i, _question(rec)[0]) for i, (_, rec) in enumerate(RECORDS)]
    assert streamed.generate_until(requests) == model.generate_until(requests)
    assert all(p.device.type == "meta" for p in streamed.model.model.language_model.layers.parameters())
