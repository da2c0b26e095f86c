"""Every run option ``qig quantize`` accepts changes what the run writes, or is declared (and shown) not to.

The method options have their own test (``test_options_change_results``). Here
each field of ``RunOptions`` is one of three kinds, and a field in none of them
fails the test, so a new option must say what it does:

- CHANGES: a run with the option set to another valid value writes other files
  (weights, search result, or the folder's file list) than the base run;
- SAME: it decides where the work happens or how memory is used, and the test
  shows the output is bit-identical;
- ELSEWHERE: it says where to write, whether to replace, or gives permission,
  or shows progress; the reason names the test that shows its effect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from _cli import run_cli
from safetensors.torch import load_file
from test_hub import OTHER, _parquet_rows, _rows, cached

from qig.embedded import world
from qig.job import RunOptions

# the option -> the flags that set it to another value than the base run's
CHANGES = {
    "method": ["--method", "mbq"],
    "model": ["--model", "{other_model}"],
    "calib": ["--calib", "{other_split}"],
    "image_folder": ["--image-folder", "{other_images}"],
    "n_samples": ["--n-samples", "3"],
    "calib_seed": ["--calib-seed", "7"],
    "max_length": ["--max-length", "64"],
    "dtype": ["--dtype", "bfloat16"],
    "format": ["--format", "compressed-tensors"],
    "report": ["--report"],
}
SAME = {
    "model_offload": (["--model-offload", "disk"], "the decoder layers stream from disk: memory, not numerics"),
    "offload_streams": (["--offload-streams", "cpu"], "the streams and group inputs wait on the host: memory only"),
}
ELSEWHERE = {
    "output": "where the folder is written",
    "overwrite": "permission to replace a folder (test_quantize_command: refused without it)",
    "resume": "continues an interrupted run; test_resume shows the result equals an uninterrupted run's",
    "no_progress": "progress bars only",
    "device": "where the run computes; this machine has a CPU only (tests/cuda, scripts/gpu_check.sh)",
    "trust_remote_code": "permission to run a checkpoint's own code (test_hub: .py files only with it)",
}
HUB = {  # options that need a hub id: the base run and the changed one both read the hub cache
    "revision": (["--model", "org/tiny-llava"], ["--model", "org/tiny-llava", "--revision", OTHER]),
    "calib_split": (
        ["--calib", "org/two", "--calib-split", "train"],
        ["--calib", "org/two", "--calib-split", "validation"],
    ),
}
SCALES = "scales"  # applies another run's scales: its own flags (--scales takes no search flags)


def _digest(out: Path) -> str:
    """The folder's tensors by name (however the model is sharded) and the names of its other files."""
    h = hashlib.sha256()
    tensors = {}
    for path in sorted(out.rglob("*.safetensors")):
        kind = "search" if path.name == "search.safetensors" else "model"
        tensors.update({f"{kind}:{k}": v for k, v in load_file(path).items()})
    for key in sorted(tensors):
        h.update(key.encode() + tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    shards = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
    for path in sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()):
        if not shards.fullmatch(path):
            h.update(path.encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model_dir, other_model_dir) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    split = world.write_split("calib", root / "split", n=6, seed=0)
    other = world.write_split("calib", root / "other", n=6, seed=1)  # the same file names, other images
    return {
        "model_dir": model_dir,
        "split": split,
        "other_model": other_model_dir,
        "other_split": other,
        "other_images": other.parent,
    }


BASE = ["--method", "awq", "--wbits", "4", "--group-size", "64", "--n-grid", "2", "--n-samples", "4", "--no-progress"]


def _quantize(tmp_path: Path, name: str, *argv) -> str:
    out = tmp_path / name
    assert run_cli("quantize", *argv, "--output", out) == 0
    return _digest(out)


def _base(inputs, tmp_path: Path) -> str:
    return _quantize(tmp_path, "base", "--model", inputs["model_dir"], "--calib", inputs["split"], *BASE)


def test_every_run_option_is_accounted_for():
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    kinds = [set(CHANGES), set(SAME), set(ELSEWHERE), set(HUB), {SCALES}]
    assert sum(map(len, kinds)) == len(set().union(*kinds)), "an option is in two kinds"
    assert set().union(*kinds) == fields


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_the_option_changes_what_is_written(key, inputs, tmp_path):
    flags = [f.format(**inputs) for f in CHANGES[key]]
    argv = ["--model", inputs["model_dir"], "--calib", inputs["split"], *BASE]
    changed = _quantize(tmp_path, "changed", *argv, *flags)  # the later flag wins (argparse)
    assert changed != _base(inputs, tmp_path), key


@pytest.mark.parametrize("key", sorted(SAME))
def test_the_option_leaves_the_result_bit_identical(key, inputs, tmp_path):
    flags, _reason = SAME[key]
    same = _quantize(tmp_path, "same", "--model", inputs["model_dir"], "--calib", inputs["split"], *BASE, *flags)
    assert same == _base(inputs, tmp_path), key


def test_applied_scales_change_what_is_written(inputs, tmp_path):
    argv = ["--model", inputs["model_dir"], "--calib", inputs["split"], *BASE[2:]]  # the base run's less --method
    _quantize(tmp_path, "mbq", *argv, "--method", "mbq")
    scales = tmp_path / "mbq" / "search.safetensors"
    applied = _quantize(tmp_path, "applied", "--model", inputs["model_dir"], "--scales", scales, "--no-progress")
    assert applied != _base(inputs, tmp_path)


@pytest.fixture
def hub(tmp_path, monkeypatch, inputs) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    shutil.copytree(inputs["model_dir"], cached(cache, "model", "org/tiny-llava"), dirs_exist_ok=True)
    shutil.copytree(
        inputs["other_model"], cached(cache, "model", "org/tiny-llava", OTHER, ref=None), dirs_exist_ok=True
    )
    rows, snapshot = _rows(inputs["split"]), cached(cache, "dataset", "org/two")
    _parquet_rows(inputs["split"], rows[:4], snapshot / "train.parquet")
    other = _rows(inputs["other_split"])
    _parquet_rows(inputs["other_split"], other[:4], snapshot / "validation.parquet")


@pytest.mark.parametrize("key", sorted(HUB))
def test_the_hub_option_changes_what_is_written(key, hub, inputs, tmp_path):
    base, changed = HUB[key]
    defaults = {"--model": inputs["model_dir"], "--calib": inputs["split"]}
    fill = [x for flag, value in defaults.items() if flag not in base for x in (flag, value)]
    first = _quantize(tmp_path, "first", *fill, *base, *BASE)
    assert _quantize(tmp_path, "second", *fill, *changed, *BASE) != first, key
