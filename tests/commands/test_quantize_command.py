"""``qig quantize``: outputs, recipes, saved scales, refusals; and the end-to-end flow on the embedded model."""

import json

import pytest
import torch
from _cli import run_cli
from _tiny import tiny_llava

EMBEDDED = ["--calib", "embedded"]  # these tiny models calibrate on the toy world, on purpose


def test_quantize_writes_a_loadable_model_and_the_search(model_dir, tmp_path, capsys):
    out = tmp_path / "qig"
    argv = ["--model", model_dir, *EMBEDDED, "--method", "qig", "--wbits", 3, "--group-size", 32, "--n-samples", 4]
    assert run_cli("quantize", *argv, "--n-grid", 5, "--output", out, "--no-progress") == 0
    assert {"config.json", "model.safetensors", "search.safetensors", "search.json", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "qig" and report["config"]["wbits"] == 3
    assert {"load", "calibration_data", "quantize", "save"} <= set(report["timings"])
    assert "torch" in report["versions"]
    search = json.loads((out / "search.json").read_text())
    assert {"loss_before", "loss_after", "weight_stats"} <= set(search["groups"][0])
    assert "loss before" in capsys.readouterr().out
    from qig.evaluate import load_model_and_processor

    model, _ = load_model_and_processor(out)
    assert not torch.equal(
        model.model.language_model.layers[0].mlp.up_proj.weight,
        tiny_llava(outliers=True).model.language_model.layers[0].mlp.up_proj.weight,
    )

    # an existing output is refused; --scales re-applies the search without calibration
    assert run_cli("quantize", "--model", model_dir, "--method", "rtn", "--output", out) == 2
    again = tmp_path / "again"
    argv = ["--model", model_dir, "--scales", out / "search.safetensors", "--output", again, "--no-progress"]
    assert run_cli("quantize", *argv) == 0
    a = load_model_and_processor(again)[0].state_dict()
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())


def test_recipe_stands_for_flags(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: awq\nwbits: 4\ngroup_size: 32\nn_samples: 2\nn_grid: 3\n")
    out = tmp_path / "awq"
    argv = ["--recipe", recipe, "--model", model_dir, *EMBEDDED, "--wbits", 3, "--output", out, "--no-progress"]
    assert run_cli("quantize", *argv) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["method"], config["wbits"], config["n_grid"]) == ("awq", 3, 3)  # the flag wins


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "awq", "--wbits", "9"], "weight bits 9"),
        (["--method", "rtn", "--group-size", "100"], "group_size 100 does not divide"),
        (["--method", "awq", "--steps", "4"], "awq has no option --steps (qig takes --steps)"),
        (["--method", "mbq", "--tokens", "vision+answer"], "mbq has no option --tokens"),
        (["--method", "mbq", "--tokens", "all"], "mbq has no option --tokens"),
        (["--method", "qig", "--calib", "/nonexistent.json"], "does not exist"),
    ],
    ids=["bits", "group-size", "qig-option-on-awq", "tokens-on-mbq", "default-tokens-on-mbq", "missing-calib"],
)
def test_bad_input_is_one_line_error(model_dir, tmp_path, capsys, argv, message):
    assert run_cli("quantize", "--model", model_dir, "--output", tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_key_is_refused(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: qig\nbitz: 3\n")
    assert run_cli("quantize", "--recipe", recipe, "--output", tmp_path / "o") == 2
    assert "unknown key(s) bitz" in capsys.readouterr().err


def test_weight_only_flow_on_the_embedded_model(tmp_path):
    from qig.embedded import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip(f"the trained embedded model is not in {default_model_dir()} yet")
    from qig.evaluate import run_eval

    out = tmp_path / "qig-w3"
    argv = ["--method", "qig", "--wbits", 3, "--group-size", 128, "--n-samples", 16, "--output", out, "--no-progress"]
    assert run_cli("quantize", *argv) == 0
    report = run_eval(model_dir=out, limit=32, reference_dir=None)
    assert report["n"] == 32 and 0 <= report["accuracy"] <= 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "gptq", "--act-order", "--damp", "0.05"], {"method": "gptq", "token_weights": None}),
        (["--method", "gptq", "--token-weights", "qig", "--steps", "2"], {"method": "gptq", "token_weights": "qig"}),
        (["--method", "gptq", "--token-weights", "mbq"], {"method": "gptq", "token_weights": "mbq"}),
        (["--method", "awq", "--quantizer", "gptq", "--n-grid", "3"], {"method": "awq", "quantizer": "gptq"}),
    ],
    ids=["gptq-act-order", "gptq-qig-hessian", "gptq-mbq-hessian", "awq-then-gptq"],
)
def test_gptq_runs_from_the_cli(model_dir, tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    common = ["--model", model_dir, *EMBEDDED, "--wbits", 3, "--group-size", 32, "--n-samples", 4, "--no-progress"]
    assert run_cli("quantize", *common, *argv, "--output", out) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert {k: v["method"] if isinstance(v := config[k], dict) else v for k in expected} == expected
    if "--act-order" in argv:
        assert config["gptq"] == {"block_size": 128, "damp": 0.05, "act_order": True}
    assert "gptq: 2 layers" in capsys.readouterr().out
    search = json.loads((out / "search.json").read_text())
    assert len(search["method_summary"]["gptq"]["seconds_per_layer"]) == 2
    # a GPTQ run is not re-applied from its scales alone
    if expected["method"] == "awq":
        again = tmp_path / "again"
        assert run_cli("quantize", "--model", model_dir, "--scales", out, "--output", again) == 2
        assert "needs calibration data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "rtn", "--quantizer", "gptq"], "rtn has no option --quantizer (awq, mbq, qig take --quantizer)"),
        (["--method", "gptq", "--quantizer", "rtn"], "gptq has no option --quantizer"),
        (["--method", "qig", "--act-order"], "quantizer is 'rtn'; pass quantizer='gptq' (CLI: --quantizer gptq)"),
        (["--method", "awq", "--damp", "0.1"], "quantizer is 'rtn'; pass quantizer='gptq' (CLI: --quantizer gptq)"),
        (["--method", "qig", "--token-weights", "qig"], "qig has no option --token-weights (gptq takes"),
        (["--method", "gptq", "--steps", "4"], "add --token-weights qig to use qig's options"),
        (["--method", "gptq", "--damp", "2"], "damp must be a number in (0, 1)"),
        (["--method", "gptq", "--damp", "0"], "damp must be a number in (0, 1)"),
        (["--method", "gptq", "--block-size", "0"], "block_size must be a positive integer"),
        (["--method", "gptq", "--block-size", "48"], "must divide one another"),
    ],
    ids=[
        "rtn-gptq",
        "gptq-rtn",
        "act-order-no-gptq",
        "damp-no-gptq",
        "weights-on-search",
        "qig-option",
        "damp",
        "damp-zero",
        "block-zero",
        "block",
    ],
)
def test_bad_gptq_combinations_are_one_line_errors(model_dir, tmp_path, capsys, argv, message):
    assert run_cli("quantize", "--model", model_dir, "--group-size", 32, "--output", tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_group_size_not_dividing_the_model_is_refused_before_writing(model_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = run_cli(
        "quantize", "--model", model_dir, "--calib", "embedded", "--method", "awq", "--group-size", 100, "--output", out
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "group_size 100 does not divide in_features" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_weight_activation_run_is_evaluated_with_quantized_activations(model_dir, tmp_path, capsys):
    out = tmp_path / "sq"
    common = ["--model", model_dir, "--calib", "embedded", "--n-samples", 4, "--no-progress", "--output", out]
    assert run_cli("quantize", "--method", "smoothquant", "--wbits", 4, "--abits", 8, "--alpha", 0.6, *common) == 0
    assert "wrote smoothquant W4A8 per-channel sym model" in capsys.readouterr().out
    entry = json.loads((out / "config.json").read_text())["qig_quantization"]
    assert entry["abits"] == 8 and entry["group_size"] is None and entry["method"] == "smoothquant"
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["abits"], config["alpha"], config["group_size"]) == (8, 0.6, None)

    from qig.evaluate import load_model_and_processor
    from qig.quant.activation import activation_quantization

    model, _ = load_model_and_processor(out)
    spec, n = activation_quantization(model)
    assert spec.bits == 8 and n == 2 * 7
    assert activation_quantization(load_model_and_processor(model_dir)[0]) is None

    assert run_cli("eval", "--model", out, "--limit", 4, "--reference", "none") == 0
    assert "activations quantized at run time: per-token symmetric 8-bit on 14 decoder linears" in (
        capsys.readouterr().out
    )

    # the saved scales re-apply as a W-A model (the saved run's abits), without calibration data
    again = tmp_path / "again"
    assert run_cli("quantize", "--model", model_dir, "--scales", out, "--output", again, "--no-progress") == 0
    reapplied, _ = load_model_and_processor(again)
    assert activation_quantization(reapplied)[0].bits == 8
    assert all(torch.equal(v, reapplied.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "rtn", "--abits", "3"], "abits 3 is not supported; use an integer from 4 to 16"),
        (["--method", "qig", "--abits", "8", "--group-size", "32"], "group_size 32 is not allowed"),
        (["--method", "gptq", "--abits", "8"], "GPTQ is weight-only here"),
        (["--method", "mbq", "--abits", "8", "--quantizer", "gptq"], "quantizer 'gptq' is weight-only"),
        (["--method", "smoothquant"], "give it abits below 16"),
        (["--method", "qig", "--abits", "8", "--alpha", "0.5"], "qig has no option --alpha (smoothquant takes"),
    ],
    ids=["abits-3", "group-size", "gptq", "mbq-gptq", "smoothquant-a16", "alpha-on-qig"],
)
def test_bad_weight_activation_combinations_are_one_line_errors(model_dir, tmp_path, capsys, argv, message):
    assert run_cli("quantize", "--model", model_dir, "--output", tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "dtype"), [([], torch.float16), (["--dtype", "bfloat16"], torch.bfloat16)], ids=["auto", "bf16"]
)
def test_the_output_keeps_the_source_dtype(tmp_path, argv, dtype):
    from safetensors import safe_open

    from qig.embedded import default_model_dir
    from qig.loading import checkpoint_dtype

    out = tmp_path / "rtn"
    assert run_cli("quantize", "--method", "rtn", "--wbits", 4, "--output", out, "--no-progress", *argv) == 0
    assert checkpoint_dtype(out) == dtype and checkpoint_dtype() == torch.float16
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert _tensor_bytes(out / "model.safetensors") <= _tensor_bytes(default_model_dir() / "model.safetensors")


def _tensor_bytes(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize(("value", "expected"), [("channel", None), ("per-channel", None), ("64", 64)])
def test_group_size_channel_on_the_command_line_means_per_channel(model_dir, tmp_path, value, expected):
    # 'channel' parses to None, which an argparse default also is: it must not read as "not given" (g128).
    out = tmp_path / "rtn"
    argv = ["quantize", "--model", model_dir, "--method", "rtn", "--wbits", 4, "--group-size", value]
    assert run_cli(*argv, "--output", out, "--no-progress") == 0
    config = json.loads((out / "config.json").read_text())["qig_quantization"]
    assert config["group_size"] == expected
    assert json.loads((out / "report.json").read_text())["config"]["group_size"] == expected


def test_inspect_reads_group_size_channel_as_per_channel():
    from qig.cli import build_parser
    from qig.commands.flags import from_args
    from qig.commands.inspect import InspectOptions

    args = build_parser().parse_args(["inspect", "--output", "maps", "--group-size", "channel"])
    assert from_args(args, InspectOptions).group_size is None
    args = build_parser().parse_args(["inspect", "--output", "maps"])
    assert from_args(args, InspectOptions).group_size == 128


@pytest.mark.parametrize("fmt", [None, "compressed-tensors"], ids=["run-folder", "export"])
def test_written_files_follow_the_umask_as_save_pretrained_leaves_them(tmp_path, fmt):
    import os
    import stat

    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        extra = ["--format", fmt] if fmt else []
        assert run_cli("quantize", "--method", "rtn", "--wbits", 4, *extra, "--output", out) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert any(name.endswith(".safetensors") for name in modes)  # safetensors' save_file writes 0600 by itself
    assert {name: m for name, m in modes.items() if m != (0o755 if (out / name).is_dir() else 0o644)} == {}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
