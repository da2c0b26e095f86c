"""The error cases of the ``qig`` command line, in one place: what is run, what it must say, how it exits.

``tests/test_error_cases.py`` runs each case through ``qig.cli.main`` and
checks it; ``scripts/errors_table.py`` runs the same cases and writes
docs/errors.md from what they actually print, so the page stays true.

A case's argv may hold ``{tmp}``, a fresh empty folder made for that case;
``setup(tmp)`` writes the files the case needs there first. ``input`` says in
words what is wrong (the table's input column, next to the argv).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TMP = "{tmp}"
TMP_PLACEHOLDER = "TMP"  # what {tmp} is shown as in docs/errors.md


@dataclass(frozen=True)
class ErrorCase:
    """One refused command: its argv, the files it needs, the exit code and a part of the message."""

    id: str
    argv: tuple[str, ...]
    code: int
    message: str  # a substring the error line must contain
    input: str = ""  # what is wrong, in words
    setup: Callable[[Path], None] | None = None
    by_argparse: bool = False  # refused by argparse itself: usage lines, then "qig CMD: error: ..."
    hide_cuda: bool = False  # run as on a machine without CUDA, wherever it runs
    xfail: str | None = None  # why the case fails for now (a pending fix); left out of docs/errors.md

    @property
    def command(self) -> str:
        return f"qig {self.argv[0]}"

    def argv_in(self, tmp: Path) -> list[str]:
        return [a.replace(TMP, str(tmp)) for a in self.argv]


@dataclass(frozen=True)
class Outcome:
    """What a case did: its exit code, its stderr, and the files it left that its setup had not made."""

    code: int | str | None
    stderr: str
    left: list[str]


def run_case(case: ErrorCase, tmp: Path, capture: bool = True) -> Outcome:
    """Set up ``case`` in the empty folder ``tmp`` and run it through ``qig.cli.main`` in-process.

    argparse's own refusals exit via SystemExit; their code is returned the same
    way. capture: collect stderr here (False: leave it to the caller, e.g. capsys).
    """
    if case.setup is not None:
        case.setup(tmp)
    before = _files(tmp)
    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        if capture:
            stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(_cuda_hidden(case.hide_cuda))
        try:
            code = _main()(case.argv_in(tmp))
        except SystemExit as exc:
            code = exc.code
    return Outcome(code, err.getvalue(), sorted(set(_files(tmp)) - set(before)))


def _main():
    from qig.cli import main

    return main


@contextlib.contextmanager
def _cuda_hidden(hide: bool):
    """``torch.cuda.is_available()`` is False inside (the --device cuda cases read the same everywhere)."""
    if not hide:
        yield
        return
    import torch

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = real


def _files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")]


def error_line(stderr: str) -> str:
    """The line a user reads: the last one of stderr (argparse prints its usage above it)."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def shown(text: str, tmp: Path) -> str:
    """``text`` as docs/errors.md shows it: the case's folder as TMP, argparse's choices unquoted.

    Neither may depend on where or under which Python it ran (Python 3.12.8
    stopped quoting argparse's "choose from" list).
    """
    for path in sorted({str(tmp.resolve()), str(tmp)}, key=len, reverse=True):
        text = text.replace(path, TMP_PLACEHOLDER)
    return re.sub(r"\(choose from ([^)]*)\)", lambda m: f"(choose from {m[1].replace(chr(39), '')})", text)


# ---------------------------------------------------------------- setups


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    """A setup writing one file (parents made) under the case's folder."""

    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    setup.__doc__ = f"writes {name}"
    return setup


def folder(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir(parents=True)

    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


def scales_file(name: str, tensors: dict) -> Callable[[Path], None]:
    """A setup writing a safetensors file of ``{key: list of floats}``."""

    def setup(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, tmp / name)

    return setup


def _calib(records) -> str:
    return json.dumps(records)


_TURNS = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "a red square"}]
OUT = f"{TMP}/out"

# ---------------------------------------------------------------- the cases

CASES: list[ErrorCase] = [
    # --- qig quantize: options of the method, recipes, calibration data, scales files
    ErrorCase(
        "quantize-flag-of-another-method",
        ("quantize", "--method", "awq", "--baseline", "zero", "--output", OUT),
        2,
        "awq has no option --baseline",
        "a QIG option given to AWQ",
    ),
    ErrorCase(
        "quantize-steps-for-rtn",
        ("quantize", "--method", "rtn", "--steps", "4", "--output", OUT),
        2,
        "rtn has no option --steps",
        "a search option given to RTN",
    ),
    ErrorCase(
        "quantize-alpha-for-qig",
        ("quantize", "--method", "qig", "--alpha", "0.5", "--output", OUT),
        2,
        "qig has no option --alpha",
        "a SmoothQuant option given to QIG",
    ),
    ErrorCase(
        "quantize-unknown-method",
        ("quantize", "--method", "hqq", "--output", OUT),
        2,
        "invalid choice: 'hqq'",
        "a method qig does not have",
        by_argparse=True,
    ),
    ErrorCase(
        "quantize-wbits-out-of-range",
        ("quantize", "--method", "rtn", "--wbits", "9", "--output", OUT),
        2,
        "weight bits 9 not supported",
        "9 weight bits",
    ),
    ErrorCase(
        "quantize-group-size-not-a-number",
        ("quantize", "--method", "rtn", "--group-size", "big", "--output", OUT),
        2,
        "group_size 'big' must be an integer",
        "a group size that is not a number",
    ),
    ErrorCase(
        "quantize-group-size-with-abits",
        ("quantize", "--method", "rtn", "--abits", "8", "--group-size", "128", "--output", OUT),
        2,
        "group_size 128 is not allowed",
        "groups in a weight-activation mode",
    ),
    ErrorCase(
        "quantize-scheme-and-differing-bits",
        ("quantize", "--method", "rtn", "--scheme", "W4A16", "--wbits", "3", "--output", OUT),
        2,
        "scheme W4A16 sets wbits 4, not 3",
        "a scheme and bits it does not have",
    ),
    ErrorCase(
        "quantize-rtn-nvfp4",
        ("quantize", "--method", "rtn", "--scheme", "NVFP4", "--output", OUT),
        2,
        "NVFP4 activations need a per-tensor scale calibrated on data",
        "NVFP4 activations with a method that reads no data",
    ),
    ErrorCase(
        "quantize-unknown-scheme",
        ("quantize", "--method", "rtn", "--scheme", "W5A16", "--output", OUT),
        2,
        "invalid choice: 'W5A16'",
        "a scheme that does not exist",
        by_argparse=True,
    ),
    ErrorCase(
        "quantize-abits-out-of-range",
        ("quantize", "--method", "rtn", "--abits", "2", "--output", OUT),
        2,
        "abits 2 is not supported",
        "2 activation bits",
    ),
    ErrorCase(
        "quantize-gptq-settings-without-gptq",
        ("quantize", "--method", "awq", "--damp", "0.1", "--output", OUT),
        2,
        "quantizer is 'rtn'",
        "GPTQ's damping for AWQ's default RTN quantizer",
    ),
    ErrorCase(
        "quantize-duo-scaling-one-candidate",
        ("quantize", "--method", "awq", "--duo-scaling", "--n-grid", "1", "--output", OUT),
        2,
        "duo_scaling changes the candidates r > 0",
        "duo scaling with a grid of one candidate (s = 1)",
    ),
    ErrorCase(
        "quantize-weight-clip-on-borrowed-token-weights",
        ("quantize", "--method", "gptq", "--token-weights", "qig", "--weight-clip", "--output", OUT),
        2,
        "only lends its token weights, so --weight-clip",
        "the clipping search on the token weights GPTQ borrows",
    ),
    ErrorCase(
        "quantize-no-output",
        ("quantize", "--method", "rtn"),
        2,
        "--output is required",
        "no --output",
    ),
    ErrorCase(
        "quantize-output-exists",
        ("quantize", "--method", "rtn", "--output", OUT),
        2,
        "already exists; pass --overwrite",
        "the output folder exists",
        setup=folder("out"),
    ),
    ErrorCase(
        "quantize-calib-for-rtn",
        ("quantize", "--method", "rtn", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "uses no calibration data",
        "calibration data for RTN",
    ),
    ErrorCase(
        "quantize-recipe-missing",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "does not exist",
        "a recipe file that is not there",
    ),
    ErrorCase(
        "quantize-recipe-not-a-mapping",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "must be a mapping of options",
        "recipe.yaml: `- wbits: 3`",
        setup=write("recipe.yaml", "- wbits: 3\n"),
    ),
    ErrorCase(
        "quantize-recipe-unknown-key",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "unknown key(s) bits",
        "recipe.yaml: `bits: 3`",
        setup=write("recipe.yaml", "bits: 3\n"),
    ),
    ErrorCase(
        "quantize-recipe-string-for-int",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "wbits 'three' is not supported",
        "recipe.yaml: `wbits: three`",
        setup=write("recipe.yaml", "method: rtn\nwbits: three\n"),
    ),
    ErrorCase(
        "quantize-recipe-float-for-int",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "n_grid 2.5 is not supported",
        "recipe.yaml: `n_grid: 2.5`",
        setup=write("recipe.yaml", "method: awq\nn_grid: 2.5\n"),
    ),
    ErrorCase(
        "quantize-recipe-string-for-bool",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "act_order must be true or false, got 'maybe'",
        "recipe.yaml: `act_order: maybe`",
        setup=write("recipe.yaml", "method: gptq\nact_order: maybe\n"),
    ),
    ErrorCase(
        "quantize-recipe-not-yaml",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "is not valid YAML",
        "recipe.yaml: `wbits: [3`",
        setup=write("recipe.yaml", "wbits: [3\n"),
    ),
    ErrorCase(
        "quantize-recipe-not-utf8",
        ("quantize", "--recipe", f"{TMP}/recipe.yaml", "--output", OUT),
        2,
        "recipe",
        "recipe.yaml holds bytes that are not UTF-8",
        setup=write("recipe.yaml", b"wbits: \xff\xfe\n"),
    ),
    ErrorCase(
        "quantize-calib-missing",
        ("quantize", "--method", "awq", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "does not exist",
        "a calibration file that is not there",
    ),
    ErrorCase(
        "quantize-calib-not-json",
        ("quantize", "--method", "awq", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "is neither a JSON list nor JSONL",
        "data.json: `{not json`",
        setup=write("data.json", "{not json\n"),
    ),
    ErrorCase(
        "quantize-calib-bad-record",
        ("quantize", "--method", "awq", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "needs 'conversations'",
        "data.json: a record with one turn",
        setup=write("data.json", _calib([{"id": "a", "conversations": _TURNS[:1]}])),
    ),
    ErrorCase(
        "quantize-calib-missing-image",
        ("quantize", "--method", "awq", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "does not exist (image folder:",
        "data.json names an image that is not there",
        setup=write("data.json", _calib([{"id": "a", "image": "a.png", "conversations": _TURNS}])),
    ),
    ErrorCase(
        "quantize-calib-not-an-image",
        ("quantize", "--method", "awq", "--calib", f"{TMP}/data.json", "--output", OUT),
        2,
        "cannot read image",
        "data.json's image is a text file",
        setup=both(
            write("data.json", _calib([{"id": "a", "image": "a.png", "conversations": _TURNS}])),
            write("a.png", "not a png\n"),
        ),
    ),
    ErrorCase(
        "quantize-n-samples-zero",
        ("quantize", "--method", "awq", "--n-samples", "0", "--output", OUT),
        2,
        "n_samples 0 is not supported",
        "no calibration samples",
    ),
    ErrorCase(
        "quantize-scales-missing",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--output", OUT),
        2,
        "does not exist; pass the search.safetensors",
        "a scales file that is not there",
    ),
    ErrorCase(
        "quantize-scales-not-safetensors",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--output", OUT),
        2,
        "is not a readable safetensors file",
        "search.safetensors holds text",
        setup=write("search.safetensors", "not tensors\n"),
    ),
    ErrorCase(
        "quantize-scales-no-scales",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--output", OUT),
        2,
        "holds no 'scales.<layer>.<group>' tensors",
        "search.safetensors without scales",
        setup=scales_file("search.safetensors", {"weights": [1.0]}),
    ),
    ErrorCase(
        "quantize-scales-malformed-key",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--output", OUT),
        2,
        "is not scales.<layer>.<group>",
        "search.safetensors: key `scales.x.mlp`",
        setup=scales_file("search.safetensors", {"scales.x.mlp": [1.0, 2.0]}),
    ),
    ErrorCase(
        "quantize-scales-nan",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--output", OUT),
        2,
        "NaN or inf",
        "search.safetensors: a NaN scale",
        setup=scales_file("search.safetensors", {"scales.0.mlp_in": [1.0, float("nan")]}),
    ),
    ErrorCase(
        "quantize-scales-with-search-options",
        ("quantize", "--scales", f"{TMP}/search.safetensors", "--n-grid", "5", "--output", OUT),
        2,
        "do not apply with --scales",
        "a search option with saved scales",
        setup=scales_file("search.safetensors", {"scales.0.mlp_in": [1.0, 2.0]}),
    ),
    ErrorCase(
        "quantize-device-cuda-without-cuda",
        ("quantize", "--method", "rtn", "--device", "cuda", "--output", OUT),
        2,
        "CUDA is not available",
        "--device cuda on a machine without CUDA",
        hide_cuda=True,
    ),
    # --- qig eval
    ErrorCase(
        "eval-model-missing",
        ("eval", "--model", f"{TMP}/model", "--limit", "2"),
        2,
        "does not exist",
        "a model folder that is not there",
    ),
    ErrorCase(
        "eval-model-is-a-file",
        ("eval", "--model", f"{TMP}/model.safetensors", "--limit", "2"),
        2,
        "is a file, not a folder",
        "a weights file instead of its folder",
        setup=write("model.safetensors", "x"),
    ),
    ErrorCase(
        "eval-model-not-a-vlm",
        ("eval", "--model", f"{TMP}/model", "--limit", "2"),
        2,
        "without a vision tower",
        "a text-only model's folder",
        setup=write("model/config.json", json.dumps({"model_type": "qwen2", "hidden_size": 8})),
    ),
    ErrorCase(
        "eval-model-corrupt-config",
        ("eval", "--model", f"{TMP}/model", "--limit", "2"),
        2,
        "is not valid JSON",
        "model/config.json: `{not json`",
        setup=write("model/config.json", "{not json"),
    ),
    ErrorCase(
        "eval-compressed-mxfp6",
        ("eval", "--model", f"{TMP}/model", "--limit", "2"),
        2,
        "stores weights as 'mxfp6-pack-quantized'; qig reads the formats",
        "a compressed-tensors checkpoint in MXFP6 (`format: mxfp6-pack-quantized`)",
        setup=write(
            "model/config.json",
            json.dumps(
                {
                    "model_type": "llava",
                    "vision_config": {},
                    "quantization_config": {
                        "quant_method": "compressed-tensors",
                        "format": "mxfp6-pack-quantized",
                        "config_groups": {
                            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 6, "type": "float"}}
                        },
                    },
                }
            ),
        ),
    ),
    ErrorCase("eval-limit-zero", ("eval", "--limit", "0"), 2, "limit 0 is not supported", "--limit 0"),
    ErrorCase("eval-batch-size-zero", ("eval", "--batch-size", "0"), 2, "batch_size 0", "--batch-size 0"),
    ErrorCase(
        "eval-device-cuda-without-cuda",
        ("eval", "--device", "cuda"),
        2,
        "CUDA is not available",
        "--device cuda on a machine without CUDA",
        hide_cuda=True,
    ),
    ErrorCase("eval-device-unknown", ("eval", "--device", "gpu"), 2, "is not a torch device", "--device gpu"),
    ErrorCase(
        "eval-image-folder-without-data",
        ("eval", "--image-folder", TMP),
        2,
        "--image-folder goes with --data",
        "images without --data",
    ),
    ErrorCase(
        "eval-json-is-a-folder",
        ("eval", "--json", TMP),
        2,
        "it is a folder, not a file",
        "--json names a folder",
    ),
    # --- qig export
    ErrorCase(
        "export-input-missing",
        ("export", "--input", f"{TMP}/run", "--output", OUT),
        2,
        "is not a folder",
        "an input folder that is not there",
    ),
    ErrorCase(
        "export-input-not-a-run",
        ("export", "--input", f"{TMP}/run", "--output", OUT),
        2,
        "has no config.json",
        "an empty folder as the input",
        setup=folder("run"),
    ),
    ErrorCase(
        "export-input-without-search-json",
        ("export", "--input", f"{TMP}/run", "--output", OUT),
        2,
        "has no search.json",
        "a model folder that 'qig quantize' did not write",
        setup=write("run/config.json", json.dumps({"model_type": "llava", "vision_config": {}})),
    ),
    ErrorCase(
        "export-output-exists",
        ("export", "--input", f"{TMP}/run", "--output", OUT),
        2,
        "already exists; pass --overwrite",
        "the output folder exists",
        setup=both(folder("run"), folder("out")),
    ),
    ErrorCase(
        "export-output-is-a-file",
        ("export", "--input", f"{TMP}/run", "--output", OUT),
        2,
        "is a file, not a folder",
        "a file where the output folder goes",
        setup=both(folder("run"), write("out", "x")),
    ),
    ErrorCase(
        "export-unknown-format",
        ("export", "--input", f"{TMP}/run", "--format", "gguf", "--output", OUT),
        2,
        "invalid choice: 'gguf'",
        "a format qig does not write",
        by_argparse=True,
    ),
    # --- qig inspect
    ErrorCase(
        "inspect-output-exists",
        ("inspect", "--output", OUT),
        2,
        "already exists; pass --overwrite",
        "the output folder exists",
        setup=folder("out"),
    ),
    ErrorCase(
        "inspect-abits",
        ("inspect", "--abits", "8", "--output", OUT),
        2,
        "abits 8 is not supported",
        "a weight-activation setting",
    ),
    ErrorCase("inspect-samples-zero", ("inspect", "--samples", "0", "--output", OUT), 2, "samples 0", "--samples 0"),
    ErrorCase(
        "inspect-image-folder-without-calib",
        ("inspect", "--image-folder", TMP, "--output", OUT),
        2,
        "--image-folder goes with --calib",
        "images without --calib",
    ),
    ErrorCase(
        "inspect-no-output",
        ("inspect",),
        2,
        "the following arguments are required: --output",
        "no --output",
        by_argparse=True,
    ),
    # --- qig world
    ErrorCase(
        "world-unknown-split",
        ("world", "test", "--output", OUT),
        2,
        "invalid choice: 'test'",
        "a split the world does not have",
        by_argparse=True,
    ),
    ErrorCase("world-n-zero", ("world", "eval", "--n", "0", "--output", OUT), 2, "n 0 is not supported", "--n 0"),
    ErrorCase(
        "world-output-exists",
        ("world", "calib", "--n", "2", "--output", OUT),
        2,
        "already exists; pass --overwrite",
        "the output folder exists",
        setup=folder("out"),
    ),
    ErrorCase(
        "world-negative-seed",
        ("world", "calib", "--n", "2", "--seed", "-1", "--output", OUT),
        2,
        "seed -1",
        "a negative seed",
    ),
]
