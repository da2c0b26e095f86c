"""The shipped recipes: every one builds a config for its methods; the embedded one runs end to end with lmms-eval."""

import json
from pathlib import Path

import pytest
from _cli import run_cli

from qig.cli import build_parser
from qig.commands.quantize import build_config, given_options, split_options

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
W_ONLY = ("rtn", "gptq", "awq", "mbq", "qig")  # the weight-only rows of the paper's tables
W_A = ("rtn", "smoothquant", "mbq", "qig")
PEER = ("awq", "gptq", "mbq", "qig")  # llm-compressor's setting (docs/migration.md): batch_size, which RTN refuses


def test_there_are_recipes_for_the_paper_and_the_embedded_model():
    names = {p.stem for p in RECIPES}
    assert {"llava-onevision-7b-w3g128", "llava-onevision-7b-w4a8", "embedded-w3g128"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_builds_each_method_of_its_table(recipe):
    methods = PEER if recipe.stem.startswith("llmcompressor-") else W_A if "a8" in recipe.stem else W_ONLY
    for method in methods:
        args = build_parser().parse_args(["quantize", "--recipe", str(recipe), "--method", method, "--output", "o"])
        run_opts, method_opts = split_options(given_options(args))
        config = build_config(run_opts, method_opts)
        assert config.name == method and config.wbits in (3, 4)
        assert (config.abits, config.group_size) == ((8, None) if "a8" in recipe.stem else (16, 128))
        if method == "rtn":  # the recipe's calibration keys are dropped for it (docs/reproduce.md runs as written)
            assert run_opts.calib is None and run_opts.image_folder is None


def test_a_recipe_serves_rtn_but_calibration_flags_given_by_hand_are_refused(model_dir, tmp_path, capsys, caplog):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\ncalib: embedded\nn_samples: 4\nwbits: 4\n")
    caplog.set_level("INFO", logger="qig")
    assert run_cli("quantize", "--recipe", recipe, "--method", "rtn", "--output", tmp_path / "a") == 0
    assert "calib, n_samples dropped (this run takes no calibration data)" in caplog.text
    argv = ["quantize", "--recipe", recipe, "--method", "rtn", "--n-samples", 4, "--output", tmp_path / "b"]
    assert run_cli(*argv) == 2
    assert "--n-samples: rtn uses no calibration data; drop them" in capsys.readouterr().err


def test_the_embedded_recipe_runs_end_to_end_and_lmms_eval_scores_it(tmp_path, capsys):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'qig[lmms-eval]')")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "embedded-w3g128.yaml"
    out = tmp_path / "qig-w3"
    assert run_cli("quantize", "--recipe", recipe, "--n-samples", 8, "--output", out, "--no-progress") == 0
    assert json.loads((out / "report.json").read_text())["config"]["wbits"] == 3
    capsys.readouterr()
    scores = tmp_path / "lmms.json"
    assert run_cli("eval", "--model", out, "--tasks", "qig_world", "--limit", 20, "--json", scores) == 0
    assert "qig_world" in capsys.readouterr().out and scores.is_file()


def test_the_migration_recipe_writes_what_qig_eval_reads(tmp_path, capsys):
    """recipes/llmcompressor-awq-w4g128.yaml (docs/migration.md): AWQ W4 g128 asym as compressed-tensors."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llmcompressor-awq-w4g128.yaml"
    out = tmp_path / "awq-w4"
    assert run_cli("quantize", "--recipe", recipe, "--n-samples", 8, "--output", out, "--no-progress") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        "pack-quantized",
        4,
        128,
        False,
    )
    assert json.loads((out / "qig" / "report.json").read_text())["config"]["batch_size"] == 16
    capsys.readouterr()
    assert run_cli("eval", "--model", out, "--limit", 20) == 0
    assert "overall" in capsys.readouterr().out
