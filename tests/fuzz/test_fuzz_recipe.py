"""Fuzzing ``qig quantize --recipe``: any YAML file ends in a config or a QigError, and nothing is written.

The run stops where ``qig quantize`` would start working: after
``build_config`` and ``check_run`` (the saved scales are read first when the
recipe names some, as the command does). Keys are the known ones (sometimes
spelled with dashes, sometimes unknown); values are right, or of the wrong
kind: bools as strings, floats for ints, lists, mappings, nulls, negative
numbers, NaN.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from _fuzz import ends_well, fast_and_slow, json_values, odd_text
from hypothesis import strategies as st

from qig.cli import build_parser
from qig.commands.quantize import RUN_OPTIONS, _known_keys, build_config, check_run, given_options, split_options
from qig.methods.config import CONFIGS, QuantConfig, all_options, token_weighting_names

PARSER = build_parser()  # built once: it imports every command


@contextmanager
def _in_fresh_folder():
    """A new empty working folder for one example (relative paths in the recipe land there), removed after."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="qig-fuzz-recipe-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------- strategies

_OPTIONS = {**RUN_OPTIONS, **all_options()}
wrong = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(),  # NaN and infinities too
    st.sampled_from(["true", "yes", "off", "3", "3.0", "-1", "channel", "none", "qig", "cpu", "cuda:0", "1e3", ""]),
    st.none(),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.sampled_from(["method", "damp", "wbits", "x"]), st.integers(-1, 8), max_size=2),
    odd_text.filter(lambda t: "\ud800" not in t),  # a lone surrogate cannot be written as YAML
)


def _right(key: str):
    """Values a key accepts, often: its choices, a number in a plausible range, a path-like string."""
    opt = _OPTIONS.get(key)
    if opt is None:
        return st.just(True)  # presets (compat)
    kind, meta = opt.kind, opt.field.metadata
    if key == "method":
        return st.sampled_from(list(CONFIGS))
    if key == "token_weights":
        return st.sampled_from(["uniform", *token_weighting_names()])
    if key == "group_size":
        return st.sampled_from([32, 64, 128, "channel", "per-channel", 0, 100, "128"])
    if key in ("wbits", "abits"):
        return st.integers(1, 17)
    if kind.choices or meta.get("choices"):
        return st.sampled_from(list(kind.choices or meta["choices"]()))
    if kind.base is bool:
        return st.booleans()
    if kind.base is int:
        return st.integers(-2, 300)
    if kind.base is float:
        return st.floats(-1, 2)
    return st.sampled_from(["model", "data.json", "images", "out", "", ".", "search.safetensors", "cpu", "cuda"])


@st.composite
def recipes(draw) -> dict:
    """A mapping over the known keys (a few unknown or dash-spelled); right values mostly, wrong ones often."""
    keys = draw(st.lists(st.sampled_from(_known_keys()), max_size=5, unique=True))
    out = {}
    for key in keys:
        spelled = key.replace("_", "-") if draw(st.integers(0, 5)) == 0 else key
        out[spelled] = draw(_right(key) if draw(st.integers(0, 3)) else wrong)
    if draw(st.integers(0, 7)) == 0:
        out[draw(st.sampled_from(["wbit", "Method", "recipe", "n-grid", "1", "None"]))] = draw(wrong)
    return out


recipe_texts = st.one_of(
    recipes().map(lambda r: yaml.safe_dump(r, allow_unicode=True)),
    recipes().map(lambda r: yaml.safe_dump(r, default_flow_style=True)),
    st.sampled_from(
        [
            "",
            "~",
            "- method: qig\n- wbits: 3\n",  # a list, not a mapping
            "wbits: 3\nwbits: 4\n",  # a repeated key
            "wbits: [\n",
            "method: qig\n\twbits: 3\n",  # a tab
            "!!python/object/apply:os.system ['true']\n",
            "a: &a [*a]\n",  # a list holding itself
            "? [1, 2]\n: 3\n",  # an unhashable key
            "wbits: 0x10\n",
            "wbits: 3_0\n",
            "1: 2\n",
            "null: 3\n",
            "method: qig\ncompat: yes\nsteps: 4\n",
            "method: gptq\ntoken_weights: qig\nsteps: 2\n",
            "scales: .\n",
            "scales: .\nmethod: rtn\n",
            "scales: search.safetensors\nwbits: 3\ngroup_size: channel\n",
            "scales: .\nabits: 8\n",
        ]
    ),
    json_values.map(lambda v: yaml.safe_dump(v) if "\ud800" not in repr(v) else "x: 1\n"),
)


# ---------------------------------------------------------------- the property


def _run_until_work(recipe: Path, out: Path):
    """What ``qig quantize --recipe R --output O`` does before it loads the model; returns the config."""
    from qig.runs import load_scales

    args = PARSER.parse_args(["quantize", "--recipe", str(recipe), "--output", str(out)])
    given = given_options(args)
    run_opts, method_opts = split_options(given)
    saved = load_scales(run_opts.scales)[1] if run_opts.scales else None
    config = build_config(run_opts, method_opts, saved)
    check_run(run_opts, config, given)
    return config


def _write_saved_run(root: Path, method: str) -> None:
    """A saved search (``search.safetensors`` + ``search.json``) in ``root``, for recipes with ``scales: .``."""
    import torch
    from safetensors.torch import save_file

    from qig.methods.config import make_config

    w_a = {"abits": 8, "group_size": None} if method == "smoothquant" else {}  # smoothquant is W-A only
    save_file({"scales.0.mlp": torch.ones(8)}, root / "search.safetensors")
    (root / "search.json").write_text(json.dumps({"config": make_config(method, **w_a).to_dict()}))


def recipe_ends_in_a_config_or_an_error(text, output_exists, saved_run):
    """Any recipe: a validated config or a QigError (never TypeError/ValueError), and no file written."""
    with _in_fresh_folder() as root:
        recipe = root / "recipe.yaml"
        recipe.write_text(text)
        out = root / "out"
        if output_exists:
            out.mkdir()
        if saved_run is not None:
            _write_saved_run(root, saved_run)
        before = _files(root)
        config = ends_well(_run_until_work, recipe, out)
        assert _files(root) == before, "checking a recipe wrote files"
        if config is not None:
            assert isinstance(config, QuantConfig)


_examples = [
    "wbits: 3.0\n",
    "group_size: [64]\n",
    "damp: .nan\nquantizer: gptq\nmethod: awq\n",
    "method: gptq\ntoken_weights: {method: qig}\n",
    "scales: .\nwbits: 3\nabits: 8\n",
    "scales: search.safetensors\nsteps: 4\n",
]
test_recipe, test_recipe_slow = fast_and_slow(
    text=recipe_texts,
    fast_examples=100,
    output_exists=st.booleans(),
    saved_run=st.one_of(st.none(), st.sampled_from(list(CONFIGS))),
    examples=tuple({"text": t, "output_exists": False, "saved_run": "qig"} for t in _examples),
)(recipe_ends_in_a_config_or_an_error)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"wbits: \xff\xfe\n", id="not-utf8"),
        pytest.param(None, id="a-folder"),
        pytest.param(
            b"wbits: " + b"[" * 3000 + b"]" * 3000 + b"\n",
            id="nested-3000-deep",
        ),
    ],
)
def test_an_unreadable_recipe_is_a_qig_error(tmp_path, content):
    recipe = tmp_path / "recipe.yaml"
    if content is None:
        recipe.mkdir()
    else:
        recipe.write_bytes(content)
    assert ends_well(_run_until_work, recipe, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()
