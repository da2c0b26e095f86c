"""Every option of ``qig eval``, ``export``, ``inspect``, ``plan`` and ``world`` changes what the command writes,
or is declared (and where it can be, shown) not to: the other commands' half of the every-flag test.

``qig quantize`` has its own (``test_options_change_results``, ``test_run_options_change_results``). Per command,
each field of its options dataclass is in one of three tables, and a field in none fails the test:

- CHANGES: ``(before, after)`` flags; the run with ``after`` writes other results than the run with ``before``
  (a report's numbers and predictions, a folder's tensors and files, the printed plan);
- SAME: the flag splits or places the work; the results are equal to the base run's;
- ELSEWHERE: where to write, permission to replace, progress, the device, or an option whose effect another
  test shows (the reason names it); a few accept one value only, and are refused otherwise (shown).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from _cli import run_cli
from safetensors.torch import load_file
from test_quantize_options import NEEDS, VALUES

from qig.commands.eval import EvalOptions
from qig.commands.export import ExportOptions
from qig.commands.inspect import InspectOptions
from qig.commands.plan import SHARED_RUN_OPTIONS, PlanOptions
from qig.commands.world import WorldOptions
from qig.embedded import world
from qig.methods import CONFIGS
from qig.methods.config import all_options, methods_with, options_of, preset_names

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real_configs"
HUB = "selects a snapshot of a hub id, resolved as qig quantize's --revision (test_run_options_change_results)"
TIME = re.compile(r"second|time|elapsed|date")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model_dir, other_model_dir) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    runs = {}
    for name, flags in {"run4": ["--wbits", "4", "--group-size", "64"], "run8": ["--wbits", "8"]}.items():
        argv = ["--model", model_dir, "--method", "rtn", *flags, "--no-progress", "--output", root / name]
        assert run_cli("quantize", *argv) == 0
        runs[name] = root / name
    return {
        "model_dir": model_dir,
        "other_model": other_model_dir,
        "split": world.write_split("calib", root / "split", n=4, seed=0),
        "other_images": world.write_split("calib", root / "other", n=4, seed=1).parent,
        "eval_split": world.write_split("eval", root / "eval-a", n=6, seed=3),
        "other_eval_images": world.write_split("eval", root / "eval-b", n=6, seed=4).parent,
        "qwen": FIXTURES / "qwen2-vl-7b-instruct",
        "other_config": FIXTURES / "qwen2.5-vl-72b-instruct",
        **runs,
    }


def _plain(value):
    """A report without its timings (keys naming seconds or time) and without paths of this run's folders."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not TIME.search(k)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _folder(out: Path) -> str:
    """A folder's tensors by name, its JSON without timings, and the bytes and names of its other files."""
    h = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        h.update(rel.encode())
        if path.suffix == ".safetensors":
            for key, t in sorted(load_file(path).items()):
                h.update(key.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
        elif path.suffix == ".json":
            h.update(json.dumps(_plain(json.loads(path.read_text())), sort_keys=True).encode())
        elif path.suffix != ".html":  # the page names the run's folder and when it was made
            h.update(path.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    options: type
    base: tuple[str, ...]  # with {placeholders} from the inputs fixture and {out}, the run's own folder
    result: str  # what the run writes: "folder" ({out}), "json" ({out}.json) or "stdout"
    changes: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    same: dict[str, tuple[tuple[str, ...], str]]
    elsewhere: dict[str, str]


COMMANDS = {
    "world": Command(
        "world",
        WorldOptions,
        ("--output", "{out}", "--n", "4"),
        "folder",
        changes={
            "split": (("calib",), ("eval",)),
            "n": (("calib",), ("calib", "--n", "5")),
            "seed": (("calib",), ("calib", "--seed", "3")),
        },
        same={},
        elsewhere={"output": "where the split is written", "overwrite": "permission to replace a folder"},
    ),
    "export": Command(
        "export",
        ExportOptions,
        ("--output", "{out}"),
        "folder",
        changes={
            "input": (("--input", "{run4}"), ("--input", "{run8}")),
            "format": (("--input", "{run4}"), ("--input", "{run4}", "--format", "fake-quant")),
            "dtype": (("--input", "{run4}"), ("--input", "{run4}", "--dtype", "bfloat16")),
        },
        same={},
        elsewhere={
            "output": "where the folder is written",
            "overwrite": "permission to replace a folder",
            "model_offload": "memory, not the output: tests/export/test_export_streamed.py, the same bytes",
        },
    ),
    "eval": Command(
        "eval",
        EvalOptions,
        ("--n", "12", "--reference", "none", "--json", "{out}.json"),  # the embedded model: it answers from the image
        "json",
        changes={
            "model": ((), ("--model", "{model_dir}")),
            "seed": ((), ("--seed", "5")),
            "n": ((), ("--n", "13")),
            "limit": ((), ("--limit", "6")),
            "data": ((), ("--data", "{eval_split}")),
            "image_folder": (
                ("--data", "{eval_split}"),
                ("--data", "{eval_split}", "--image-folder", "{other_eval_images}"),
            ),
            "reference": ((), ("--reference", "{other_model}")),
            "blank_images": ((), ("--blank-images",)),
        },
        same={
            "batch_size": (("--batch-size", "5"), "questions per forward: padded batches, the same answers"),
            "model_offload": (("--model-offload", "disk"), "the decoder layers read from disk as called: the same"),
        },
        elsewhere={
            "json": "where the report is written",
            "device": "where the model runs; this machine has a CPU only (tests/cuda, scripts/gpu_check.sh)",
            "tasks": "runs lmms-eval's tasks instead (tests/lmms: the same answers as qig eval)",
            "revision": HUB,
        },
    ),
    "inspect": Command(
        "inspect",
        InspectOptions,
        ("--samples", "2", "--layers", "0", "--no-progress", "--output", "{out}"),
        "folder",
        changes={
            "model": ((), ("--model", "{model_dir}", "--calib", "{split}")),
            "calib": ((), ("--calib", "{split}")),
            "image_folder": (("--calib", "{split}"), ("--calib", "{split}", "--image-folder", "{other_images}")),
            "embedded": ((), ("--embedded", "captions")),
            "samples": ((), ("--samples", "3")),
            "seed": ((), ("--seed", "1")),
            "layers": ((), ("--layers", "1")),
            "wbits": ((), ("--wbits", "4")),
            "group_size": ((), ("--group-size", "64")),
            "baseline": ((), ("--baseline", "zero")),
            "steps": ((), ("--steps", "4")),
            "max_length": ((), ("--max-length", "54")),  # cuts the answers' last tokens (56 still fits them)
        },
        same={},
        elsewhere={
            "batch_size": "samples per forward: the order of float sums only (test_options_change_results: such "
            "options change the bits, so no equality is claimed)",
            "abits": "accepts 16 only (weight-only is what inspect pictures); any other value is refused (shown)",
            "calib_split": "the split of a hub dataset id (test_hub: --calib-split picks the rows)",
            "revision": HUB,
            "device": "where the model runs; this machine has a CPU only",
            "output": "where the folder is written",
            "overwrite": "permission to replace a folder",
            "no_progress": "progress bars only",
        },
    ),
    "plan": Command(
        "plan",
        PlanOptions,
        ("--model", "{qwen}", "--method", "qig", "--wbits", "4"),
        "stdout",
        changes={
            "model": ((), ("--model", "{other_config}")),
            "image_size": ((), ("--image-size", "448x448")),
            "sample_tokens": ((), ("--sample-tokens", "500")),
            "text_tokens": ((), ("--text-tokens", "10")),
            "device_memory": ((), ("--device-memory", "24")),
            "json": ((), ("--json",)),
        },
        same={},
        elsewhere={"revision": HUB},
    ),
}


_RESULTS: dict[tuple, str] = {}  # (command, flags) -> result: the base runs are shared by the cases


def _result(cmd: Command, inputs: dict, out: Path, flags, capsys) -> str:
    key = (cmd.name, tuple(flags))
    if key not in _RESULTS:
        _RESULTS[key] = _run(cmd, inputs, out, flags, capsys)
    return _RESULTS[key]


def _run(cmd: Command, inputs: dict, out: Path, flags, capsys) -> str:
    fill = {**inputs, "out": out}
    argv = [a.format(**fill) for a in (*cmd.base, *flags)]
    capsys.readouterr()
    assert run_cli(cmd.name, *argv) == 0, argv
    printed = capsys.readouterr().out
    if cmd.result == "stdout":
        return printed
    if cmd.result == "json":
        return json.dumps(_plain(json.loads(Path(f"{out}.json").read_text())), sort_keys=True)
    return _folder(out)


def test_every_option_of_every_command_is_accounted_for():
    for cmd in COMMANDS.values():
        fields = {f.name for f in dataclasses.fields(cmd.options)}
        tables = [set(cmd.changes), set(cmd.same), set(cmd.elsewhere)]
        assert sum(map(len, tables)) == len(set().union(*tables)), f"{cmd.name}: an option is in two tables"
        assert set().union(*tables) == fields, f"qig {cmd.name}: {fields ^ set().union(*tables)}"


CHANGE_CASES = [(c, k) for c, cmd in COMMANDS.items() for k in cmd.changes]
SAME_CASES = [(c, k) for c, cmd in COMMANDS.items() for k in cmd.same]


@pytest.mark.parametrize(("command", "key"), CHANGE_CASES, ids=[f"{c}-{k}" for c, k in CHANGE_CASES])
def test_the_option_changes_what_the_command_writes(command, key, inputs, tmp_path, capsys):
    cmd = COMMANDS[command]
    before, after = cmd.changes[key]
    first = _result(cmd, inputs, tmp_path / "before", before, capsys)
    assert _result(cmd, inputs, tmp_path / "after", after, capsys) != first, f"qig {command} --{key}"


@pytest.mark.parametrize(("command", "key"), SAME_CASES, ids=[f"{c}-{k}" for c, k in SAME_CASES])
def test_the_option_leaves_the_results_equal(command, key, inputs, tmp_path, capsys):
    cmd = COMMANDS[command]
    flags, _reason = cmd.same[key]
    assert _result(cmd, inputs, tmp_path / "a", flags, capsys) == _result(cmd, inputs, tmp_path / "b", (), capsys)


def test_inspect_refuses_every_abits_but_weight_only(tmp_path, capsys):
    assert run_cli("inspect", "--abits", "8", "--output", tmp_path / "o") == 2
    assert "abits" in capsys.readouterr().err


def _flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", *([] if v is True else [str(v)]))]


def test_plan_takes_quantize_s_shared_run_options_and_method_options_and_each_changes_the_plan(inputs, capsys):
    """plan's other flags are qig quantize's: each changes the plan it prints (its memory, or its settings)."""
    keys = [*all_options(), *preset_names()]
    assert set(keys) <= set(VALUES), "a method option without a test value"
    shared = {"method": ["--method", "awq"], "n_samples": ["--n-samples", "64"]}
    shared["offload_streams"] = ["--offload-streams", "cpu"]
    assert set(shared) == set(SHARED_RUN_OPTIONS)

    def plan(*flags) -> str:
        capsys.readouterr()
        assert run_cli("plan", "--model", inputs["qwen"], "--json", *flags) == 0, flags
        return capsys.readouterr().out

    for key, flags in shared.items():
        assert plan(*flags) != plan(), key
    for key in keys:
        method = next(m for m in [*methods_with(key), "smoothquant"] if m != "smoothquant" or key == "alpha")
        needs = {k: v for k, v in NEEDS.get(key, {}).items() if k in options_of(CONFIGS[method])}
        before = {**({"wbits": 8, "abits": 8} if method == "smoothquant" else {}), **needs}
        after = {**before, key: VALUES[key]}
        assert plan("--method", method, *_flags(after)) != plan("--method", method, *_flags(before)), key
