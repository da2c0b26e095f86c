"""``qig inspect`` and ``qig quantize --report``: the report folder, its pictures and numbers, refusals."""

import json

import pytest
from _cli import run_cli
from PIL import Image

EMBEDDED = ["--calib", "embedded"]  # these tiny models calibrate on the toy world, on purpose


def _check_report(out, n_samples, layers):
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "maps.json", "weights.safetensors", "overview.png", "shares.png", "variability.png"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left
    data = json.loads((out / "maps.json").read_text())
    assert data["shown_layers"] == layers and len(data["samples"]) == n_samples
    for s in data["samples"]:
        (image,) = s["images"]
        n_vision = s["roles"].count("vision")
        assert image["rows"] * image["cols"] == n_vision == 36  # the overlay grid covers every vision token
        assert 0 < s["entropy"]["qig"][f"{layers[0]}.attn_in"]["vision"] <= 1
    assert len(data["files"]["samples"]) == n_samples
    for name in data["files"]["samples"] + ["overview.png"]:
        with Image.open(out / name) as im:
            assert im.width >= 600 and im.height >= 600
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # readable offline
    assert all(f"src='{n}'" in html for n in data["files"]["samples"])
    return data


def test_inspect_writes_pictures_html_and_numbers(model_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    argv = ["inspect", "--model", model_dir, *EMBEDDED, "--samples", 2, "--layers", "0,-1", "--group-size", 32]
    assert run_cli(*argv, "--output", out, "--no-progress") == 0
    data = _check_report(out, 2, [0, 1])
    assert data["methods"] == ["awq", "mbq", "qig"]
    assert data["shares"]["awq"]["1.mlp_in"]["vision"] == pytest.approx(36 / len(data["samples"][0]["tokens"]), 0.2)
    assert "index.html" in capsys.readouterr().out
    # an existing output is refused unless --overwrite
    assert run_cli(*argv, "--output", out, "--no-progress") == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(*argv, "--output", out, "--no-progress", "--overwrite") == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--abits", "8"], "abits 8 is not supported; use an integer from 16 to 16"),
        (["--layers", "9"], "layer 9 does not exist"),
        (["--group-size", "100"], "group_size 100"),
        (["--samples", "0"], "samples 0 is not supported; use an integer >= 1"),
    ],
    ids=["abits", "layer", "group-size", "samples"],
)
def test_bad_input_is_one_line_error(model_dir, tmp_path, capsys, argv, message):
    assert run_cli("inspect", "--model", model_dir, "--calib", "embedded", "--output", tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_report_shows_the_weights_the_run_used(model_dir, tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", "--model", model_dir, *EMBEDDED, "--method", "qig", "--wbits", 3, "--group-size", 32]
    assert run_cli(*argv, "--n-samples", 2, "--n-grid", 2, "--output", out, "--report", "--no-progress") == 0
    data = _check_report(out / "report", 2, [0, 1])
    assert data["methods"] == ["qig"]
    assert run_cli("quantize", "--model", model_dir, "--method", "rtn", "--output", tmp_path / "r", "--report") == 2


def test_embedded_model_maps_are_not_uniform(tmp_path):
    from qig.embedded import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip(f"the trained embedded model is not in {default_model_dir()} yet")
    out = tmp_path / "maps"
    assert run_cli("inspect", "--samples", 8, "--layers", "0,3,-1", "--output", out, "--no-progress") == 0
    data = _check_report(out, 8, [0, 3, 5])
    one_region = [s for s in data["samples"] if s["type"] in ("colour", "shape", "digit")]
    assert one_region, "the default embedded samples hold a question about one object"
    for s in one_region:  # the deepest pictured layer's attention input is concentrated
        assert s["entropy"]["qig"]["5.attn_in"]["vision"] < 0.99
