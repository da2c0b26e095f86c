"""lmms-eval with ``--model qig`` answers as ``qig eval`` does, activation quantizers included (offline).

On 100 embedded questions: the FP model, an AWQ W4 g128 run (and its
compressed-tensors export, where the export extra is installed) and an RTN
W4A4 run, each scored by ``qig eval`` and by lmms-eval (``qig eval --tasks
qig_world``: lmms-eval's simple_evaluate, the shipped task, the qig model),
give the same answers one by one; the W4A4 answers differ from the FP ones,
so lmms-eval really ran the quantized activations.
"""

import importlib.util
import json

import pytest
import yaml
from _cli import run_cli

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms-eval]' && pip install --no-deps lmms-eval)"
)

N = 100
HAS_CT = importlib.util.find_spec("compressed_tensors") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Model folders by name: the embedded FP model (None), AWQ W4 g128 and RTN W4A4, quantized once."""
    tmp = tmp_path_factory.mktemp("lmms-runs")
    awq = ["--method", "awq", "--wbits", 4, "--group-size", 128, "--n-samples", 16]
    rtn = ["--method", "rtn", "--wbits", 4, "--abits", 4]
    for name, argv in (("awq-w4", awq), ("rtn-w4a4", rtn)):
        assert run_cli("quantize", *argv, "--output", tmp / name, "--no-progress") == 0
    folders = {"fp": None, "awq-w4": tmp / "awq-w4", "rtn-w4a4": tmp / "rtn-w4a4"}
    if HAS_CT:
        assert run_cli("export", "--input", tmp / "awq-w4", "--output", tmp / "awq-w4-ct") == 0
        folders["awq-w4-ct"] = tmp / "awq-w4-ct"
    return folders


def _answers(tmp_path, model, *argv) -> list[str]:
    out = tmp_path / "report.json"
    model_args = [] if model is None else ["--model", model]
    assert run_cli("eval", *model_args, "--limit", N, *argv, "--json", out) == 0
    report = json.loads(out.read_text())
    out.unlink()
    return [r["prediction"] for r in report["predictions"]] if "tasks" not in report else report["predictions"]


@pytest.fixture(scope="module")
def answers(runs, tmp_path_factory):
    """Per run: (qig eval's answers, lmms-eval's answers) on the same N questions."""
    tmp = tmp_path_factory.mktemp("lmms-answers")
    out = {}
    for name, model in runs.items():
        qig = _answers(tmp, model, "--reference", "none")
        lmms = _answers(tmp, model, "--tasks", "qig_world")["qig_world"]
        out[name] = (qig, lmms)
    return out


CT = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (the export extra)")


@pytest.mark.parametrize(
    "name",
    ["fp", "awq-w4", pytest.param("awq-w4-ct", marks=CT), "rtn-w4a4"],
    ids=["fp", "awq-w4-g128", "awq-w4-g128-compressed-tensors", "rtn-w4a4"],
)
def test_lmms_eval_gives_qig_evals_answers(answers, name):
    qig, lmms = answers[name]
    assert len(qig) == len(lmms) == N
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(qig, lmms, strict=True)) if a != b]
    assert not differ, f"{name}: {len(differ)} answers differ (index, qig eval, lmms-eval): {differ[:5]}"


def test_w4a4_runs_with_its_activation_quantizers(answers):
    fp, w4a4 = answers["fp"][1], answers["rtn-w4a4"][1]
    same = sum(a == b for a, b in zip(fp, w4a4, strict=True))
    # lmms-eval's llava_hf (plain transformers) gives the FP answers for this folder; the qig model must not
    assert same < N // 2, f"W4A4 through lmms-eval agrees with FP on {same}/{N}: its activation quantizers are missing"


def test_the_entry_point_names_the_qig_model():
    from lmms_eval.models import get_model

    from qig.lmms.model import QigModel

    assert get_model("qig") is QigModel


def test_the_embedded_task_generates_as_many_tokens_as_qig_eval():
    from qig.evaluate import MAX_NEW_TOKENS
    from qig.lmms import TASKS_DIR

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((TASKS_DIR / "qig_world" / "qig_world.yaml").read_text(), Loader=Loader)
    assert config["generation_kwargs"]["max_new_tokens"] == MAX_NEW_TOKENS
