"""The named schemes (``--scheme``): one spec drives fake-quant, the export and its dequantization, bit for bit.

Per scheme a tiny LLaVA is quantized in float32 (``--scheme``, RTN; NVFP4's
calibrated activation scales need a calibrated method: AWQ with one candidate,
which is RTN plus the calibration) and exported as compressed-tensors. The
checks: the scheme's compressed-tensors config; the stored codes and scales
dequantize (by compressed-tensors' own decompression, as transformers loads
them) to the fake-quant weights bit for bit; and the model transformers loads
gives the fake-quant model's logits, its activation quantization included
(compressed-tensors' own at load, qig's in the fake-quant model).

The quantizer itself is checked against compressed-tensors' ``fake_quantize``
for the same parameters, per number format, for weights and activations.
"""

import json

import pytest
import torch
from _cli import run_cli
from _tiny import calibration

from qig.errors import QigError
from qig.quant.activation import fake_quantize_activations
from qig.quant.schemes import SCHEMES
from qig.quant.spec import QuantSpec, activation_spec, fake_quantize, global_scale, quant_params, round_fp4

pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize  # noqa: E402

# The compressed-tensors arguments of each number, as llm-compressor's presets write them.
CT_WEIGHTS = {
    "int4-sym-g128": (QuantSpec(4, 128, True), dict(type="int", strategy="group", group_size=128)),
    "int8-sym-channel": (QuantSpec(8, None, True), dict(type="int", strategy="channel")),
    "fp8-channel": (QuantSpec(8, None, True, number="fp8"), dict(type="float", strategy="channel")),
    "nvfp4": (
        QuantSpec(4, 16, True, number="nvfp4"),
        dict(type="float", strategy="tensor_group", group_size=16, scale_dtype=torch.float8_e4m3fn),
    ),
    "mxfp4": (
        QuantSpec(4, 32, True, number="mxfp4"),
        dict(type="float", strategy="group", group_size=32, scale_dtype=torch.uint8),
    ),
}


def _ct_qdq(x, spec, kwargs, tensor_scale=None):
    """compressed-tensors' fake-quant of ``x`` [rows, C] with qig's parameters for ``spec``."""
    args = QuantizationArgs(num_bits=spec.bits, symmetric=True, **kwargs)
    scale, zero = quant_params(x, spec, tensor_scale)  # [rows, n_groups]
    gs = tensor_scale if tensor_scale is not None else global_scale(x, spec)
    if gs is not None:
        scale = scale * gs  # the FP8 group scale compressed-tensors keeps; it divides by the global scale itself
    return ct_fake_quantize(x, scale, zero, args, global_scale=gs)


@pytest.mark.parametrize("name", list(CT_WEIGHTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_weights_fake_quantize_as_compressed_tensors_does(name, dtype):
    torch.manual_seed(0)
    spec, kwargs = CT_WEIGHTS[name]
    w = (torch.randn(64, 256) * torch.rand(64, 1) * 3).to(dtype)
    w[3, :32] = 0.0  # an all-zero group
    want = _ct_qdq(w, spec, kwargs).to(dtype)
    assert torch.equal(fake_quantize(w, spec), want)


@pytest.mark.parametrize(
    "number, kwargs",
    [
        pytest.param("int", dict(type="int", strategy="token", dynamic=True), id="int8-token"),
        pytest.param("fp8", dict(type="float", strategy="token", dynamic=True), id="fp8-token"),
        pytest.param(
            "nvfp4",
            dict(
                type="float", strategy="tensor_group", group_size=16, dynamic="local", scale_dtype=torch.float8_e4m3fn
            ),
            id="nvfp4-static-tensor-scale",
        ),
        pytest.param(
            "mxfp4",
            dict(type="float", strategy="group", group_size=32, dynamic=True, scale_dtype=torch.uint8),
            id="mxfp4-group",
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_activations_fake_quantize_as_compressed_tensors_does(number, kwargs, dtype):
    """With qig's scales; and for the float numbers with the scales compressed-tensors itself computes at run time
    (for int8 it divides by 127.5, qig and vLLM's int8 kernels by 127: test_export_weight_activation; for FP8 of a
    bfloat16 tensor it rounds the scale absmax / 448 to bfloat16, qig and vLLM's scaled_fp8_quant keep float32)."""
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(1)
    bits = 4 if number in ("nvfp4", "mxfp4") else 8
    spec = activation_spec(bits, number)
    x = (torch.randn(2, 5, 64) * 4).to(dtype)  # [b, T, C]
    tensor_scale = torch.tensor([448 * 6 / 20.0]) if number == "nvfp4" else None  # calibrated elsewhere: 20
    got = fake_quantize_activations(x, spec, tensor_scale)
    want = _ct_qdq(x.reshape(10, 64), spec, kwargs, tensor_scale).reshape(x.shape).to(dtype)
    assert torch.equal(got, want)
    if number != "int" and not (number == "fp8" and dtype == torch.bfloat16):
        args = QuantizationArgs(num_bits=bits, symmetric=True, **kwargs)
        scale, zero = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(64, 64), global_scale=tensor_scale)
        own = ct_fake_quantize(x, scale, zero, args, global_scale=tensor_scale).to(dtype)
        assert torch.equal(got, own)


def test_fp4_rounds_to_the_nearest_value_ties_to_the_even_code():
    x = torch.tensor([0.1, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 9.0])
    assert round_fp4(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0]
    assert round_fp4(-x).tolist() == [-v for v in round_fp4(x).tolist()]


# --scheme, the method that runs it here, and the compressed-tensors format and activation type it exports to
EXPORTS = {
    "W4A16": ("rtn", "pack-quantized", None),
    "W4A16_ASYM": ("rtn", "pack-quantized", None),
    "W8A16": ("rtn", "pack-quantized", None),
    "W8A8": ("rtn", "int-quantized", "int"),
    "FP8_DYNAMIC": ("rtn", "float-quantized", "float"),
    "W4AFP8": ("rtn", "pack-quantized", "float"),
    "NVFP4A16": ("rtn", "nvfp4-pack-quantized", None),
    "NVFP4": ("awq", "nvfp4-pack-quantized", "float"),
    "MXFP4A16": ("rtn", "mxfp4-pack-quantized", None),
    "MXFP4": ("rtn", "mxfp4-pack-quantized", "float"),
}


def test_every_scheme_has_an_export_case():
    assert set(EXPORTS) == set(SCHEMES)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """Per scheme (made on first use): the fake-quant run folder and its compressed-tensors export."""
    made = {}

    def make(scheme):
        if scheme not in made:
            method, _, _ = EXPORTS[scheme]
            root = tmp_path_factory.mktemp(scheme.lower())
            run, out = root / "fq", root / "ct"
            extra = ("--calib", "embedded", "--n-samples", 8, "--n-grid", 1) if method == "awq" else ()
            args = ("--model", model_dir, "--method", method, "--scheme", scheme, "--dtype", "float32", *extra)
            assert run_cli("quantize", *args, "--no-progress", "--output", run) == 0
            assert run_cli("export", "--input", run, "--output", out) == 0
            made[scheme] = run, out
        return made[scheme]

    return make


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval().to(dtype)


def _logits(model):
    batch = next(calibration(4, seed=3).batches(4))
    with torch.no_grad():
        return model(**batch.inputs).logits


@pytest.mark.parametrize("scheme", list(EXPORTS))
def test_export_config_is_the_schemes(exported, scheme):
    _, fmt, act_type = EXPORTS[scheme]
    _, out = exported(scheme)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    spec = SCHEMES[scheme].weights
    assert qc["format"] == fmt
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (spec.bits, spec.group_size)
    assert group["weights"]["symmetric"] == spec.symmetric
    acts = group.get("input_activations")
    assert (acts or {}).get("type") == act_type


@pytest.mark.parametrize("scheme", list(EXPORTS))
def test_stored_codes_decompress_to_the_fake_quant_weights(exported, scheme):
    """compressed-tensors' own decompression (what transformers runs at load) gives the saved weights, bit for bit."""
    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file

    from qig.export.scheme import scheme_for

    run, out = exported(scheme)
    fmt = EXPORTS[scheme][1]
    setting = SCHEMES[scheme]
    ct_scheme = scheme_for(setting.weights, setting.activations).quantization_scheme(["Linear"])
    stored, fake = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    names = sorted(k[: -len(".weight_scale")] for k in stored if k.endswith(".weight_scale"))
    assert len(names) == 14  # 2 layers x 7 linears
    compressor = BaseCompressor.get_value_from_registry(fmt)
    # compressed-tensors decompresses FP4 packs in bfloat16 (its unpacking's dtype): NVFP4's product
    # fp4 * fp8 / global is rounded to bfloat16 there, as qig's fake-quant weights are in a bfloat16 model.
    dtype = torch.bfloat16 if setting.weights.number in ("nvfp4", "mxfp4") else torch.float32
    for name in names:
        local = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
        weight = compressor.decompress(local, ct_scheme)["weight"]
        assert torch.equal(weight, fake[f"{name}.weight"].to(dtype)), name


@pytest.mark.parametrize("scheme", list(EXPORTS))
def test_transformers_loads_the_export_with_the_fake_quant_logits(exported, scheme):
    from qig.loading import load_model_and_processor

    run, out = exported(scheme)
    if scheme == "W8A8":
        pytest.skip("compressed-tensors rounds int8 activations with absmax / 127.5: test_export_weight_activation")
    # transformers keeps FP4 packs compressed and runs them in bfloat16 (see above): compared in bfloat16
    dtype = torch.bfloat16 if SCHEMES[scheme].weights.number in ("nvfp4", "mxfp4") else torch.float32
    fake, _ = load_model_and_processor(run, dtype=str(dtype).removeprefix("torch."))  # activation quantizers too
    got, want = _logits(_load(out, dtype)), _logits(fake)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bfloat16 runs differ from qig's by rounding; no more than qig's own bfloat16 run differs from float32
        fake32, _ = load_model_and_processor(run, dtype="float32")
        own = (want.float() - _logits(fake32)).abs().mean()
        assert (got.float() - want.float()).abs().mean() <= own
    if SCHEMES[scheme].activations is not None:  # and the activations really are quantized
        assert (want - _logits(_load(run))).abs().max() > 1e-3


def _tensor_scale(module) -> float | None:
    from qig.quant.activation import activation_tensor_scale

    scale = activation_tensor_scale(module)
    return None if scale is None else float(scale)


@pytest.mark.parametrize("scheme", list(EXPORTS))
def test_qig_reads_the_export_as_its_fake_quant_model(exported, scheme):
    """qig eval's loader decompresses the export and installs the scheme's activation quantizers (NVFP4's with the
    stored input_global_scale): the fake-quant model, weights bit for bit (NVFP4's as compressed-tensors decompresses
    them, in bfloat16) and quantizers equal."""
    from qig.loading import load_model_and_processor
    from qig.quant.activation import activation_spec_of

    run, out = exported(scheme)
    got, _ = load_model_and_processor(out, dtype="float32")
    want, _ = load_model_and_processor(run, dtype="float32")
    nvfp4 = SCHEMES[scheme].weights.number == "nvfp4"
    a, b = dict(want.named_modules()), dict(got.named_modules())
    for name, lin in want.model.language_model.layers.named_modules():
        if isinstance(lin, torch.nn.Linear):
            w = lin.weight.data.to(torch.bfloat16).float() if nvfp4 else lin.weight.data
            mine = b[f"model.language_model.layers.{name}"]
            assert torch.equal(mine.weight.data, w), name
            assert activation_spec_of(mine) == activation_spec_of(lin)
            assert _tensor_scale(mine) == _tensor_scale(lin), name
    assert a.keys() == b.keys()
    if not nvfp4:
        torch.testing.assert_close(_logits(got), _logits(want), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(("--scheme", "W4A16", "--wbits", 3), "scheme W4A16 sets wbits 4, not 3", id="scheme-and-wbits"),
        pytest.param(
            ("--scheme", "FP8_DYNAMIC", "--group-size", 128), "sets group_size None, not 128", id="scheme-and-group"
        ),
        pytest.param(("--scheme", "NVFP4"), "NVFP4 activations need a per-tensor scale", id="rtn-nvfp4"),
        pytest.param(("--method", "gptq", "--scheme", "FP8_DYNAMIC"), "GPTQ is weight-only", id="gptq-wa"),
    ],
)
def test_combinations_that_do_not_exist_are_one_line_errors(model_dir, tmp_path, capsys, args, message):
    method = () if "--method" in args else ("--method", "rtn")
    code = run_cli("quantize", "--model", model_dir, *method, *args, "--calib", "embedded", "--output", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_float_number_fixes_its_group_size():
    with pytest.raises(QigError, match="nvfp4 quantizes 4-bit symmetric values in groups of 16"):
        QuantSpec(4, 32, True, number="nvfp4")
