"""Evaluation on a small subset of the eval split, fidelity and blank images."""

import pytest

from qig.evaluate import normalize_answer, run_eval


@pytest.fixture(scope="module")
def fp_report():
    return run_eval(limit=120, seed=4321)


def test_fp_model_answers_correctly(fp_report):
    assert fp_report["n"] == 120
    assert fp_report["accuracy"] >= 0.9
    assert set(fp_report["per_type"]) >= {"colour", "shape", "count", "digit", "position", "relation", "sum"}
    row = fp_report["predictions"][0]
    assert set(row) >= {"id", "type", "answer", "prediction", "correct"}


def test_answers_depend_on_the_image(fp_report):
    blank = run_eval(limit=120, seed=4321, blank_images=True)
    assert blank["accuracy"] < fp_report["accuracy"] - 0.4


def test_model_agrees_with_itself():
    rep = run_eval(limit=24, seed=1, reference_dir=None)
    assert "fidelity" not in rep
    from qig.embedded import default_model_dir

    rep = run_eval(limit=24, seed=1, reference_dir=default_model_dir())
    assert rep["fidelity"]["agreement"] == 1.0
    assert rep["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_normalize_answer():
    assert normalize_answer(" Top  Left.") == "top left"
