"""Every method quantizes the embedded model on the device as it does on the CPU (``-m cuda``).

The device is ``QIG_TEST_DEVICE`` (default ``cuda``; the tests skip when CUDA is
not available). ``QIG_TEST_DEVICE=cpu`` runs them on the CPU against the CPU, a
smoke test of the comparisons themselves (``scripts/gpu_check.sh --device cpu``).
Per method, both runs start from the shipped model in float32 with the same
calibration samples (``QIG_TEST_SAMPLES``, default 16), and are compared by:

- the searches' grid ratios: equal in at least ``ratios`` of the groups, and
  every group's weighted loss after the search within 2% (a differing ratio is
  then a near tie, not a different answer);
- the integer codes of every decoder weight (from each run's own stored scale
  and zero): equal in at least ``codes`` of them (RTN, SmoothQuant, GPTQ);
- accuracy on the embedded eval split (``QIG_TEST_EVAL_N`` questions, default
  1000; both models scored on the device): within 0.3 points.

A bf16 run on the device (QIG, the model loaded in bfloat16) is compared with
the float32 CPU run by looser bounds (half the ratios, losses within 10%,
accuracy within 1 point), set from a CPU bf16 run (8 samples): 15 of QIG's 18
ratios matched float32's, the losses were within 6% (bf16 rounds the block
outputs the loss is taken on), the accuracy was equal. Every bound is a count
or a share, never a time.
"""

import math
import os
from dataclasses import dataclass
from functools import cache

import pytest
import torch

import qig
from qig.calib import calibration_for
from qig.evaluate import eval_split, evaluate_records
from qig.loading import load_model_and_processor
from qig.methods import AWQConfig, GPTQConfig, MBQConfig, QIGConfig, RTNConfig, SmoothQuantConfig
from qig.models import family_for
from qig.quant.spec import quantize_with

DEVICE = os.environ.get("QIG_TEST_DEVICE", "cuda")
N_SAMPLES = int(os.environ.get("QIG_TEST_SAMPLES", "16"))
N_EVAL = int(os.environ.get("QIG_TEST_EVAL_N", "1000"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="CUDA is not available (QIG_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]

ACCURACY_POINTS = 0.3
LOSS_RTOL = 0.02


@dataclass(frozen=True)
class Case:
    config: object
    ratios: float | None = None  # share of searched groups whose grid ratio must be equal
    codes: float | None = None  # share of decoder weights whose integer codes must be equal
    scales_rtol: float | None = None  # closed-form scales (SmoothQuant): max relative difference


W3 = dict(wbits=3, group_size=128)
CASES = {
    "rtn": Case(RTNConfig(**W3), codes=0.9999),
    "awq": Case(AWQConfig(**W3), ratios=0.75),
    "mbq": Case(MBQConfig(**W3), ratios=0.75),
    "qig": Case(QIGConfig(**W3), ratios=0.75),
    "smoothquant-w8a8": Case(SmoothQuantConfig(wbits=8, abits=8, group_size=None), codes=0.99, scales_rtol=1e-3),
    "gptq": Case(GPTQConfig(**W3), codes=0.9),
    "gptq+qig": Case(GPTQConfig.weighted_by("qig", **W3), codes=0.9),
}


@dataclass
class Run:
    result: object
    codes: dict[str, torch.Tensor]  # "layer.linear" -> integer codes [out, in]
    accuracy: float


@cache
def _setup():
    model, processor = load_model_and_processor(None)
    calib = calibration_for(model, processor, n_samples=N_SAMPLES)
    return processor, calib, eval_split(limit=N_EVAL)


def _codes(model, result) -> dict[str, torch.Tensor]:
    """Each decoder linear's integer codes, from the quantized weights and the run's own scale and zero."""
    layers = family_for(model).decoder_layers(model)
    spec = result.config.spec
    out = {}
    for key, params in result.quantized.items():
        layer, _, path = key.partition(".")
        w = layers[int(layer)].get_submodule(path).weight.detach().float().cpu()
        out[key] = quantize_with(w, params["scale"].float().cpu(), params["zero"].float().cpu(), spec)
    return out


def _run(name: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[Run, torch.nn.Module]:
    processor, calib, records = _setup()
    model, _ = load_model_and_processor(None, dtype=dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = qig.quantize(model, CASES[name].config, calib, device=device, progress=False)
    if device.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0, "the device run never allocated on the GPU"
    codes = _codes(model, result)
    model.to(device=DEVICE, dtype=torch.float32)  # both runs scored alike: on the device, in float32
    accuracy = evaluate_records(model, processor, records)["accuracy"]
    return Run(result, codes, accuracy), model.to("cpu")


@cache
def _cpu(name: str) -> Run:
    return _run(name, "cpu")[0]


def _searched(result) -> list:
    return [g for g in result.groups if g.ratio is not None]


def _compare_searches(ref: Run, dev: Run, share: float, loss_rtol: float) -> None:
    a, b = _searched(ref.result), _searched(dev.result)
    assert [(g.layer, g.group) for g in a] == [(g.layer, g.group) for g in b]
    equal = sum(x.ratio == y.ratio for x, y in zip(a, b, strict=True))
    assert equal >= math.ceil(share * len(a)), (
        f"{equal} of {len(a)} grid ratios equal (bound {share:.0%}): "
        f"cpu {[x.ratio for x in a]} vs {DEVICE} {[y.ratio for y in b]}"
    )
    for x, y in zip(a, b, strict=True):
        assert abs(x.loss_after - y.loss_after) <= loss_rtol * max(abs(x.loss_after), abs(y.loss_after)), (
            f"layer {x.layer} {x.group}: loss after the search {x.loss_after:.5g} (cpu) vs {y.loss_after:.5g}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_device_run_matches_cpu(name):
    case = CASES[name]
    ref = _cpu(name)
    dev, _ = _run(name, DEVICE)
    if case.ratios is not None:
        _compare_searches(ref, dev, case.ratios, LOSS_RTOL)
    if case.scales_rtol is not None:
        sa, sb = ref.result.scales(), dev.result.scales()
        assert sa.keys() == sb.keys()
        for key in sa:
            rel = float(((sa[key] - sb[key]).abs() / sa[key].abs().clamp(min=1e-12)).max())
            assert rel <= case.scales_rtol, f"{key}: scales differ by {rel:.2e} (bound {case.scales_rtol:.0e})"
    if case.codes is not None:
        assert ref.codes.keys() == dev.codes.keys()
        total = sum(c.numel() for c in ref.codes.values())
        equal = sum(int((ref.codes[k] == dev.codes[k]).sum()) for k in ref.codes)
        assert equal >= case.codes * total, f"{equal} of {total} integer codes equal (bound {case.codes:.2%})"
    points = 100 * abs(ref.accuracy - dev.accuracy)
    assert points <= ACCURACY_POINTS + 1e-9, (
        f"accuracy {100 * ref.accuracy:.1f}% (cpu) vs {100 * dev.accuracy:.1f}% ({DEVICE}) on {N_EVAL} questions"
    )


def test_bf16_run_on_device_is_close_to_float32_on_cpu():
    ref = _cpu("qig")
    dev, model = _run("qig", DEVICE, torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _compare_searches(ref, dev, share=0.5, loss_rtol=0.10)
    points = 100 * abs(ref.accuracy - dev.accuracy)
    assert points <= 1.0 + 1e-9, (
        f"accuracy {100 * ref.accuracy:.1f}% (float32, cpu) vs {100 * dev.accuracy:.1f}% (bfloat16, {DEVICE})"
    )
