"""Shared fixtures of the method tests: a tiny LLaVA with outlier channels, calibration and held-out data."""

import pytest
import torch
from _tiny import calibration, tiny_llava


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
