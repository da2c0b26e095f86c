"""Adding a method is one module: a config, a class, ``register``; the CLI and the API pick it up."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from _cli import run_cli
from _tiny import tiny_llava

import qig
from qig.calib import ANSWER
from qig.methods import CONFIGS, SearchConfig, TokenWeights, register, token_weighting_names
from qig.methods import base as methods_base
from qig.methods.base import Method, uniform_weights
from qig.options import option

EMBEDDED = ["--calib", "embedded"]  # these tiny models calibrate on the toy world, on purpose


@dataclass(frozen=True)
class AnswerHeavyConfig(SearchConfig):
    """A toy search: every real token weighs 1, answer tokens ``emphasis``."""

    name: ClassVar[str] = "answer-heavy"
    emphasis: float = option(4.0, "weight of answer tokens", min=0.0)


class AnswerHeavy(Method):
    def token_weights(self, ctx) -> TokenWeights:
        w = [uniform_weights(r) * torch.where(r == ANSWER, self.config.emphasis, 1.0) for r in ctx.roles]
        return TokenWeights(w, {"emphasis": self.config.emphasis})


@pytest.fixture
def toy_method():
    """Register the toy method for one test, then restore the registry."""
    saved = dict(CONFIGS), dict(methods_base._REGISTRY)
    register(AnswerHeavyConfig)(AnswerHeavy)
    yield AnswerHeavyConfig
    for live, old in zip((CONFIGS, methods_base._REGISTRY), saved, strict=True):
        live.clear()
        live.update(old)


def test_a_registered_method_runs_through_the_api(toy_method, calib):
    config = toy_method(wbits=3, group_size=32, n_grid=4)
    result = qig.quantize(tiny_llava(outliers=True), config, calib, progress=False)
    assert result.groups and all(g.scales is not None and g.notes == {"emphasis": 4.0} for g in result.groups)
    assert "answer-heavy" in token_weighting_names()  # a search: GPTQ may borrow its weights


def test_a_registered_method_runs_through_the_cli(toy_method, model_dir, tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["--model", model_dir, "--calib", "embedded", "--method", "answer-heavy", "--emphasis", 2.5, "--wbits", 3]
    assert (
        run_cli(
            "quantize", *argv, "--group-size", 32, "--n-samples", 2, "--n-grid", 3, "--output", out, "--no-progress"
        )
        == 0
    )
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["method"], config["emphasis"], config["n_grid"]) == ("answer-heavy", 2.5, 3)
    # its option is refused for the other methods, naming who takes it
    argv = ["--model", model_dir, "--method", "awq", "--emphasis", 2, "--output", tmp_path / "o"]
    assert run_cli("quantize", *argv) == 2
    assert "awq has no option --emphasis (answer-heavy takes --emphasis)" in capsys.readouterr().err
    # GPTQ borrows its token weights, its options given alongside
    out = tmp_path / "gptq"
    argv = ["--model", model_dir, *EMBEDDED, "--method", "gptq", "--token-weights", "answer-heavy", "--emphasis", 3]
    assert run_cli("quantize", *argv, "--wbits", 3, "--group-size", 32, "--n-samples", 2, "--output", out) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["token_weights"]["method"] == "answer-heavy" and config["token_weights"]["emphasis"] == 3
