"""Every method runs every scheme it claims (``--scheme``), its search scoring with the scheme's own quantizers.

Which method takes which scheme is the configs' own rule: GPTQ is weight-only,
SmoothQuant W-A only, RTN cannot calibrate NVFP4's activation scales; every
other pair runs. A run is checked for what makes it that scheme: every decoder
weight lies on the scheme's grid (the stored parameters reproduce it exactly),
and a W-A scheme leaves the scheme's activation quantizers on the linears.

The fast suite runs the matrix on a tiny random LLaVA; ``-m slow`` on the
embedded model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import processor, tiny_llava

import qig
from qig.calib import EMBEDDED, calibration_for
from qig.errors import QigError
from qig.export.params import from_params
from qig.methods import CONFIGS, make_config
from qig.methods.config import options_of
from qig.models import family_for
from qig.quant.activation import activation_spec_of
from qig.quant.schemes import SCHEMES

FAST = {"n_grid": 2, "steps": 2}  # the searches' cheapest settings, where the method has them
MATRIX = [(m, s) for m in CONFIGS for s in SCHEMES]


def _config(method: str, scheme: str):
    own = options_of(CONFIGS[method])
    return make_config(method, scheme=scheme, **{k: v for k, v in FAST.items() if k in own})


def _claims(method: str, scheme: str) -> bool:
    try:
        _config(method, scheme)
    except QigError:
        return False
    return True


def test_the_refused_pairs_are_the_documented_ones():
    refused = sorted((m, s) for m, s in MATRIX if not _claims(m, s))
    wa = sorted(s for s, sch in SCHEMES.items() if sch.activations is not None)
    weight_only = sorted(s for s, sch in SCHEMES.items() if sch.activations is None)
    assert refused == sorted([("gptq", s) for s in wa] + [("smoothquant", s) for s in weight_only] + [("rtn", "NVFP4")])


def _run_and_check(world, method: str, scheme: str) -> None:
    """Quantize a copy of the world's model with the pair; its weights, parameters and quantizers are the scheme's."""
    model, calib = world
    model = copy.deepcopy(model)
    result = qig.quantize(model, _config(method, scheme), calib, progress=False)
    setting = SCHEMES[scheme]
    family = family_for(model)
    linears = family.decoder_linears(model)
    assert len(result.quantized) == len(linears)
    for path, lin in linears.items():
        params = result.quantized[path.removeprefix(f"{family.layers}.")]
        # the saved weight is exactly the stored parameters' grid (from_params refuses anything else)
        from_params(lin.weight.data, params["scale"], params["zero"], setting.weights, path, params.get("global_scale"))
        assert activation_spec_of(lin) == setting.activations
        if setting.activations is not None and setting.activations.number == "nvfp4":
            assert params["input_global_scale"].shape == (1,) and float(params["input_global_scale"]) > 0


@pytest.fixture(scope="module")
def tiny_world():
    model = tiny_llava(outliers=True, layers=1)
    return model, calibration_for(model, processor(), EMBEDDED, n_samples=4)


@pytest.mark.parametrize(("method", "scheme"), [p for p in MATRIX if _claims(*p)], ids=lambda v: str(v))
def test_every_method_runs_every_scheme_it_claims(tiny_world, method, scheme):
    _run_and_check(tiny_world, method, scheme)


@pytest.fixture(scope="module")
def embedded_world():
    from qig.loading import load_model_and_processor

    model, proc = load_model_and_processor(None, dtype=torch.float32)
    return model, calibration_for(model, proc, EMBEDDED, n_samples=8)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "scheme"), [p for p in MATRIX if _claims(*p)], ids=lambda v: str(v))
def test_every_method_runs_every_scheme_it_claims_on_the_embedded_model(embedded_world, method, scheme):
    _run_and_check(embedded_world, method, scheme)
