"""``qig eval --tasks``: options that do not apply are refused, and every lmms-eval failure is one line, exit 2."""

import sys

import pytest
from _cli import run_cli


def _eval(capsys, *argv):
    capsys.readouterr()
    code = run_cli("eval", *argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, refused",
    [
        (["--data", "qa.json"], "--data"),
        (["--data", "qa.json", "--image-folder", "img"], "--data, --image-folder"),
        (["--reference", "none"], "--reference"),
        (["--blank-images"], "--blank-images"),
    ],
    ids=["data", "image-folder", "reference", "blank-images"],
)
def test_options_of_qig_evals_own_scoring_are_refused(capsys, argv, refused):
    code, err = _eval(capsys, "--tasks", "qig_world", *argv)
    assert code == 2 and err.startswith(f"error: {refused} not taken with --tasks") and err.count("\n") == 1


def test_seed_and_n_go_with_the_embedded_task_only(capsys):
    code, err = _eval(capsys, "--tasks", "vizwiz_vqa_val", "--seed", 3)
    assert code == 2 and "--seed not taken with --tasks" in err


@pytest.mark.parametrize("tasks", [",", "qig_world,qig_world"], ids=["empty", "twice"])
def test_bad_task_lists_are_refused(capsys, tasks):
    code, err = _eval(capsys, "--tasks", tasks)
    assert code == 2 and err.startswith("error: --tasks") and err.count("\n") == 1


def test_without_lmms_eval_the_error_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)
    code, err = _eval(capsys, "--tasks", "qig_world", "--limit", 2)
    assert code == 2 and "lmms-eval is not installed or does not import" in err
    assert "pip install 'qig[lmms-eval]'" in err


def test_an_unknown_task_is_named_with_close_matches(capsys):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    code, err = _eval(capsys, "--tasks", "vizwizvqa_val", "--limit", 2)
    assert code == 2 and "unknown lmms-eval task 'vizwizvqa_val'" in err and "vizwiz_vqa_val" in err


def test_an_error_inside_lmms_eval_is_one_line_not_exit_0(capsys, monkeypatch):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from qig.lmms.model import QigModel

    def boom(self, requests):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(QigModel, "generate_until", boom)
    code, err = _eval(capsys, "--tasks", "qig_world", "--limit", 2, "--n", 2)
    last = err.rstrip("\n").split("\n")[-1]  # after the loading progress bars
    assert code == 2 and last == "error: lmms-eval failed on qig_world: RuntimeError: out of memory"


@pytest.mark.parametrize(
    "results",
    [None, {"results": {}}, {"results": {"qig_world": {"alias": "qig_world", "exact_match,none": "N/A"}}}],
    ids=["none", "empty", "no-value"],
)
def test_a_run_without_a_score_is_refused(results):
    from qig.errors import QigError
    from qig.lmms.run import check_results

    with pytest.raises(QigError, match="lmms-eval (returned|scored) no"):
        check_results(results, ["qig_world"])
