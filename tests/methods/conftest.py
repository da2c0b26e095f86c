"""Shared fixtures of the method tests: a tiny LLaVA with outlier channels, calibration and held-out data."""

import pytest
import torch
from _tiny import calibration, tiny_llava

import qig


@pytest.fixture(scope="module")
def calib():
    return calibration(8, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return next(calibration(8, seed=1).batches(8))


@pytest.fixture(scope="module")
def fp_logits(held_out):
    with torch.no_grad():
        return tiny_llava(outliers=True)(**held_out.inputs).logits


@pytest.fixture(scope="module")
def logit_error(held_out, fp_logits):
    """Mean |logits - FP logits| of a model over the held-out batch's real tokens."""

    def error(model) -> float:
        with torch.no_grad():
            logits = model(**held_out.inputs).logits
        real = held_out.inputs["attention_mask"].bool()
        return float((logits - fp_logits)[real].abs().mean())

    return error


@pytest.fixture(scope="module")
def quantized_error(calib, logit_error):
    """Quantize a fresh tiny LLaVA with outlier channels by a config; its logit error."""

    def error(config) -> float:
        model = tiny_llava(outliers=True)
        qig.quantize(model, config, calib, progress=False)
        return logit_error(model)

    return error
