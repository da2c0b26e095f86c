"""``qig quantize``'s method flags: every flag reaches its config, or is refused naming the method's options."""

import dataclasses

import pytest
from _cli import run_cli

from qig.cli import build_parser
from qig.commands.quantize import build_config, given_options, split_options
from qig.errors import QigError
from qig.methods import CONFIGS, QIGConfig
from qig.methods.config import all_options, options_of, preset_names

# A valid value other than the default for each option, and what else it needs to be valid.
VALUES = {
    "wbits": 3,
    "group_size": 64,
    "batch_size": 3,
    "batch_tokens": 4096,
    "abits": 8,
    "n_grid": 5,
    "loss": "mse",
    "quantizer": "gptq",
    "block_size": 64,
    "damp": 0.05,
    "act_order": True,
    "reference_output": "quantized",
    "pad_tokens": "count",
    "token_weights": "qig",
    "grad_batch_size": 2,
    "baseline": "zero",
    "clip": "none",
    "steps": 4,
    "attention_steps": 5,
    "quadrature": "riemann",
    "uniform_first_groups": 3,
    "tokens": "vision+answer",
    "fq_linears": "block",
    "fq_gradient": "none",
    "alpha": 0.7,
    "weight_clip": True,
    "duo_scaling": True,
    "scheme": "NVFP4A16",
    "compat": True,
}
OWN_VALUES = {("smoothquant", "scheme"): "FP8_DYNAMIC"}  # W-A only: a W-A scheme with its BASE's bits
NEEDS = {  # option -> the other options that make its value valid, where the method takes them
    "block_size": {"quantizer": "gptq"},
    "damp": {"quantizer": "gptq"},
    "act_order": {"quantizer": "gptq"},
    "reference_output": {"abits": 8},
}
BASE = {"smoothquant": {"wbits": 8, "abits": 8}}  # smoothquant runs only in W-A modes
WEIGHT_ACTIVATION = {"smoothquant"}


def _argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def _config(method: str, options: dict):
    args = build_parser().parse_args(["quantize", "--method", method, "--output", "o", *_argv(options)])
    run_opts, method_opts = split_options(given_options(args))
    return build_config(run_opts, method_opts)


def _field(config, key: str):
    if key in {f.name for f in dataclasses.fields(config)}:
        return getattr(config, key)
    return getattr(config.gptq, key)  # a GPTQ setting, flattened into the flags


CASES = [(m, k) for m in CONFIGS for k in [*all_options(), *preset_names()]]


def test_the_cases_cover_every_option():
    assert set(VALUES) == {k for _, k in CASES}


@pytest.mark.parametrize(("method", "key"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_every_flag_reaches_its_config_or_is_refused(method, key):
    cls = CONFIGS[method]
    takes = key in options_of(cls) or key in cls.presets
    options = dict(BASE.get(method, {}))
    if takes:
        options.update({k: v for k, v in NEEDS.get(key, {}).items() if k in options_of(cls)})
    if method in WEIGHT_ACTIVATION and key == "group_size":
        pytest.skip("W-A weights are per channel: no group size to set")
    if method == "gptq" and key == "abits":
        pytest.skip("GPTQ is weight-only: abits below 16 is refused by the config itself")
    options[key] = OWN_VALUES.get((method, key), VALUES[key])
    if not takes:
        with pytest.raises(QigError, match=f"{method} has no option --{key.replace('_', '-')}|is a preset of") as err:
            _config(method, options)
        assert "\n" not in str(err.value)
        if "has no option" in str(err.value):
            assert f"; {method}'s options: " in str(err.value)
        return
    config = _config(method, options)
    if key == "compat":
        assert config == QIGConfig.compat()
    elif key == "token_weights":
        assert config.token_weights.name == VALUES[key]
    else:
        assert _field(config, key) == options[key]


@pytest.mark.parametrize(
    "argv",
    [
        ["--method", "awq", "--baseline", "zero"],
        ["--method", "awq", "--clip", "none"],
        ["--method", "rtn", "--n-grid", "5", "--loss", "mse"],
        ["--method", "awq", "--grad-batch-size", "2"],
        ["--method", "smoothquant", "--wbits", "8", "--abits", "8", "--n-grid", "3"],
    ],
    ids=["awq-baseline", "awq-clip", "rtn-grid-loss", "awq-grad-batch", "smoothquant-grid"],
)
def test_flags_that_used_to_be_dropped_are_refused(model_dir, tmp_path, capsys, argv):
    assert run_cli("quantize", "--model", model_dir, "--output", tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    method = argv[1]
    assert err.startswith(f"error: {method} has no option --") and f"; {method}'s options: --abits" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_compat_takes_the_flags_given_over_the_preset():
    config = _config("qig", {"compat": True, "baseline": "quantized", "clip": "none"})
    assert (config.baseline, config.clip, config.steps, config.quadrature) == ("quantized", "none", 32, "riemann")


def test_calibration_flags_do_not_apply_to_rtn(model_dir, tmp_path, capsys):
    argv = ["--model", model_dir, "--method", "rtn", "--n-samples", 4, "--output", tmp_path / "o"]
    assert run_cli("quantize", *argv) == 2
    assert "--n-samples: rtn uses no calibration data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("overwrite: 'false'\n", "overwrite 'false' is not supported; use true or false"),
        ("compat: 'false'\n", "compat 'false'"),
        ("group_size: 64.5\n", "group_size 64.5 must be an integer"),
        ("n_samples: 'many'\n", "n_samples 'many' is not supported; use an integer >= 1"),
    ],
    ids=["overwrite-string", "compat-string", "group-size-float", "n-samples-string"],
)
def test_recipe_values_are_type_checked(tmp_path, capsys, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    assert run_cli("quantize", "--recipe", path, "--output", tmp_path / "o") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "value", ["'false'", "'true'", "1", "yes-please"], ids=["str-false", "str-true", "int", "word"]
)
def test_an_existing_folder_is_replaced_only_by_a_real_true(model_dir, tmp_path, capsys, value):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: rtn\noverwrite: {value}\n")
    assert run_cli("quantize", "--recipe", recipe, "--model", model_dir, "--output", out) == 2
    assert "overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_rtn_refuses_the_batch_fields_it_never_reads(tmp_path, capsys):
    from qig.methods import RTNConfig

    with pytest.raises(QigError, match="rtn does not use batch_size"):
        RTNConfig(wbits=4, batch_size=3)
    assert run_cli("quantize", "--method", "rtn", "--batch-tokens", 4096, "--output", tmp_path / "o") == 2
    assert "rtn has no option --batch-tokens" in capsys.readouterr().err


def test_a_run_saved_with_the_old_seed_field_still_loads():
    from qig.runs import config_from_dict

    saved = {**QIGConfig(wbits=3).to_dict(), "seed": 0}  # search.json of a run made before seed went
    assert config_from_dict(saved) == QIGConfig(wbits=3)
