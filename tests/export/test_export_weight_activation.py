"""W8A8 and W4A8 exports (int-quantized): what transformers loads, against qig's W-A fake-quant model.

transformers + compressed-tensors loads these with a quantizer on every decoder
linear's input that fake-quantizes activations per token at run time, with
scale ``absmax / 127.5`` (compressed-tensors' ``calculate_qparams``: half the
integer range); qig's W-A model (and vLLM's int8 kernels) use ``absmax / 127``.
So the loaded export equals qig's weights run with compressed-tensors'
activation rounding exactly, and differs from qig's own W-A model by that
rounding only. qig itself reads the export as it reads any compressed-tensors
folder (``qig.compressed``): decompressed, with its own activation quantizers,
so ``qig eval`` gives the W-A model's answers exactly.
"""

import json

import pytest
import torch
from _cli import run_cli
from _tiny import calibration

from qig.quant.spec import decode

pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp  # noqa: E402


@pytest.fixture(scope="module", params=[8, 4], ids=["w8a8", "w4a8"])
def wa_run(request, tmp_path_factory):
    """The embedded model at W{8,4}A8 (RTN, per-channel symmetric weights) and its compressed-tensors export."""
    root = tmp_path_factory.mktemp(f"w{request.param}a8")
    run, out = root / "fq", root / "ct"
    args = ("--method", "rtn", "--wbits", request.param, "--abits", 8, "--dtype", "float32")  # float32: see awq_run
    assert run_cli("quantize", *args, "--output", run) == 0
    assert run_cli("export", "--input", run, "--output", out) == 0
    return request.param, run, out


def _load(path):
    from transformers import AutoModelForImageTextToText

    # .to: see test_export._load (transformers 5.19 + compressed-tensors 0.17 keep parts in float16)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval().to(torch.float32)


def _with_ct_activation_rounding(model):
    """Per-token 8-bit activation quantize-dequantize on the decoder linears, computed by compressed-tensors."""
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)

    def hook(module, inputs):
        x = inputs[0]
        scale, zero = compute_dynamic_scales_and_zp(x, args, module)
        return (fake_quantize(x, scale, zero, args),)

    for m in model.model.language_model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    return model


def test_config_is_the_int_quantized_scheme(wa_run):
    wbits, _, out = wa_run
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized" and "dequantize" not in qc
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["strategy"], w["symmetric"], w["dynamic"]) == (wbits, "channel", True, False)
    assert (a["num_bits"], a["strategy"], a["symmetric"], a["dynamic"]) == (8, "token", True, True)
    assert "qig_quantization" not in json.loads((out / "config.json").read_text())


def test_loaded_export_has_the_fake_quant_weights_and_ct_activation_rounding(wa_run):
    wbits, run, out = wa_run
    export, plain = _load(out), _load(run)
    batch = next(calibration(4, seed=3).batches(4))
    with torch.no_grad():
        got = export(**batch.inputs).logits  # the first forward decompresses the int8 weights
        want = _with_ct_activation_rounding(plain)(**batch.inputs).logits
    a, b = plain.state_dict(), export.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # weights bit for bit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the activations really are quantized: the weights alone give other logits
    with torch.no_grad():
        weights_only = _load(run)(**batch.inputs).logits
    assert (got - weights_only).abs().max() > 1e-2


def test_eval_on_the_export_gives_qigs_wa_model_answers(wa_run):
    from qig.evaluate import run_eval

    _, run, out = wa_run
    fake = run_eval(model_dir=run, limit=100)  # qig's W-A model: its activation quantizers re-installed
    export = run_eval(model_dir=out, limit=100)  # decompressed by qig.compressed, qig's activation quantizers
    assert [r["prediction"] for r in export["predictions"]] == [r["prediction"] for r in fake["predictions"]]
    assert export["accuracy"] == fake["accuracy"] and export["activations"] == fake["activations"]


def test_stored_int8_codes_dequantize_to_the_fake_quant_weights(wa_run):
    from safetensors import safe_open

    wbits, run, out = wa_run
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(run / "model.safetensors", "pt") as g:
        names = [k[: -len(".weight_scale")] for k in f.keys() if k.endswith(".weight_scale")]
        assert len(names) == 42
        for name in names:
            q, scale = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale")  # [out, in], [out, 1]
            assert q.dtype == torch.int8 and -(2 ** (wbits - 1)) <= int(q.min()) and int(q.max()) < 2 ** (wbits - 1)
            assert torch.equal(decode(q, scale, torch.zeros_like(scale)), g.get_tensor(f"{name}.weight")), name
