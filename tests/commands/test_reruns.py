"""Reruns are byte-identical: the same ``qig quantize`` twice writes the same model and search files."""

import json

import pytest
from _cli import run_cli

CALIBRATED = ["--calib", "embedded", "--n-samples", "16"]
RUNS = {
    "rtn": ["--method", "rtn", "--wbits", "3", "--group-size", "32"],  # rtn refuses calibration flags
    "awq": ["--method", "awq", "--wbits", "3", "--group-size", "32", *CALIBRATED],
    "mbq": ["--method", "mbq", "--wbits", "3", "--group-size", "32", *CALIBRATED],
    "qig": ["--method", "qig", "--wbits", "3", "--group-size", "32", *CALIBRATED],
    "gptq": ["--method", "gptq", "--wbits", "3", "--group-size", "32", *CALIBRATED],
    "smoothquant": ["--method", "smoothquant", "--wbits", "8", "--abits", "8", *CALIBRATED],
}


def _without_timings(search: dict) -> dict:
    """search.json less its timings: each group's ``seconds`` and GPTQ's ``seconds_per_layer``."""
    search = json.loads(json.dumps(search))
    for group in search["groups"]:
        group.pop("seconds")
    search["method_summary"].get("gptq", {}).pop("seconds_per_layer", None)
    return search


@pytest.mark.parametrize("method", list(RUNS), ids=list(RUNS))
def test_a_rerun_writes_the_same_bytes(model_dir, tmp_path, method):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_cli("quantize", "--model", model_dir, *RUNS[method], "--no-progress", "--output", out) == 0
    a, b = outs
    for name in ("model.safetensors", "search.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    search_a, search_b = (json.loads((out / "search.json").read_text()) for out in outs)
    assert _without_timings(search_a) == _without_timings(search_b)
