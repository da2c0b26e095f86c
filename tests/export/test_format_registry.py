"""Adding an export format is one module: a class, ``register``; ``qig export --format`` and the flow pick it up."""

import json

import pytest
import torch
from _cli import run_cli
from safetensors.torch import load_file, save_file

from qig.errors import QigError
from qig.export import check_format, export_after, format_names
from qig.export.formats import ExportFormat, Written, register
from qig.export.formats import base as formats_base
from qig.quant.spec import QuantSpec, activation_spec


class DequantizedWeights(ExportFormat):
    """A toy format: the decoder linears' dequantized weights in one safetensors file, the setting in a JSON."""

    name = "dequantized-weights"
    help = "decoder weights dequantized into weights.safetensors, the setting in setting.json"

    def check(self, spec, act_spec=None, act_order=False):
        if act_spec is not None:
            raise QigError(f"dequantized-weights holds weight-only settings, not activation bits {act_spec.bits}")

    saves_model = False  # its files are its own: no model.safetensors

    def begin(self, model, *, family, run, linears, ignored):
        self.weights, self.setting = {}, {"bits": run.spec.bits, "group_size": run.spec.group_size, "kept": ignored}

    def write_layer(self, model, quantized):
        for p, qw in quantized.items():
            self.weights[f"{p}.weight"] = qw.dequantize(model.get_submodule(p).weight.dtype)

    def end(self, folder):
        save_file(self.weights, folder / "weights.safetensors")
        (folder / "setting.json").write_text(json.dumps(self.setting))
        return Written("one-file", "toy: nothing serves it")


@pytest.fixture
def toy_format():
    """Register the toy format for one test, then restore the registry."""
    saved = dict(formats_base._REGISTRY)
    register(DequantizedWeights)
    yield DequantizedWeights.name
    formats_base._REGISTRY.clear()
    formats_base._REGISTRY.update(saved)


RTN_W4 = ("--method", "rtn", "--wbits", 4, "--group-size", 128, "--no-progress")


def _run_weights(run) -> dict[str, torch.Tensor]:
    """The run's fake-quant weights by in-memory name, as transformers loads them."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(run).state_dict()


def test_a_registered_format_is_written_by_qig_export(toy_format, model_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "toy"
    assert run_cli("quantize", "--model", model_dir, *RTN_W4, "--output", run) == 0
    assert run_cli("export", "--input", run, "--format", toy_format, "--output", out) == 0
    printed = capsys.readouterr().out
    assert f"wrote {toy_format} model to {out} (one-file)" in printed and "toy: nothing serves it" in printed
    weights, expected = load_file(out / "weights.safetensors"), _run_weights(run)
    assert weights and all(torch.equal(w, expected[k]) for k, w in weights.items())
    setting = json.loads((out / "setting.json").read_text())
    assert (setting["bits"], setting["group_size"]) == (4, 128) and "lm_head" in setting["kept"]
    # the shared flow adds the processor and the run files
    assert (out / "qig" / "search.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_a_registered_format_is_written_by_qig_quantize(toy_format, model_dir, tmp_path, capsys):
    """``qig quantize --format``: its choices come from the registry; the run is written, then exported."""
    out = tmp_path / "direct"
    assert run_cli("quantize", "--model", model_dir, *RTN_W4, "--format", toy_format, "--output", out) == 0
    assert {"qig", "setting.json", "weights.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # saves_model = False: the format writes its own files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    # the library call it makes: the run written to a temporary folder, then exported
    again = tmp_path / "again"

    def write_run(folder):
        assert run_cli("quantize", "--model", model_dir, *RTN_W4, "--output", folder) == 0

    assert export_after(write_run, again, toy_format) == again
    weights, expected = load_file(out / "weights.safetensors"), load_file(again / "weights.safetensors")
    assert (
        weights and weights.keys() == expected.keys() and all(torch.equal(w, expected[k]) for k, w in weights.items())
    )
    refused = run_cli(
        "quantize",
        "--model",
        model_dir,
        "--method",
        "rtn",
        "--wbits",
        8,
        "--abits",
        8,
        "--format",
        toy_format,
        "--output",
        tmp_path / "wa",
    )
    assert refused == 2 and "not activation bits 8" in capsys.readouterr().err


def test_a_registered_format_refuses_what_it_cannot_hold(toy_format):
    check_format(toy_format, QuantSpec(bits=4, group_size=128))
    with pytest.raises(QigError, match="not activation bits 8"):
        check_format(toy_format, QuantSpec(bits=8, group_size=None, symmetric=True), activation_spec(8))


def test_an_unregistered_format_is_refused(capsys):
    """The toy is gone once its test is over; the built-in formats stay, in their order."""
    assert format_names() == ("compressed-tensors", "fake-quant")
    with pytest.raises(QigError, match="format 'dequantized-weights' is not supported; use one of: compressed-tensors"):
        check_format("dequantized-weights", QuantSpec(bits=4, group_size=128))
    with pytest.raises(SystemExit) as exc:  # argparse refuses it
        run_cli("export", "--input", ".", "--format", "dequantized-weights", "--output", "x")
    assert exc.value.code == 2 and "invalid choice: 'dequantized-weights'" in capsys.readouterr().err
