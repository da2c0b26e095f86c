"""Fuzzing ``qig.runs.load_scales`` (``qig quantize --scales``): any file ends in scales or a QigError.

Files are safetensors written by the library (random keys, shapes, dtypes and
values: NaN, inf, zero, negative), safetensors assembled by hand (a random
header: dtypes torch may lack, shapes and offsets that disagree, a header
longer than the file), random bytes, and folders with or without a
``search.safetensors`` and a ``search.json`` beside it.

Two properties: the reader never raises anything but a QigError; and what it
returns is usable, a positive finite 1-D float tensor per (layer >= 0, group)
key (malformed keys and values refused instead).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from _fuzz import ends_well, fast_and_slow, json_values
from hypothesis import strategies as st
from safetensors.torch import save_file

from qig.runs import load_scales

# ---------------------------------------------------------------- strategies

layers = st.sampled_from(["0", "1", "27", "-1", "x", "", "1.5", "01", " 2", "1e3", "٣"])  # ٣: an Arabic-Indic 3
groups = st.sampled_from(["mlp", "attn.qkv", "attn", "", "ü", "v.o", "mlp."])
keys = st.one_of(
    st.builds(lambda layer, group: f"scales.{layer}.{group}", layers, groups),
    st.builds(lambda layer, group: f"scales.{layer}.{group}", st.just("0"), st.just("mlp")),  # a valid key, often
    st.sampled_from(["scales.0", "scales.", "scales", "other.0.mlp", "quantized.0.mlp.scale", "weights.0.mlp"]),
    st.text(max_size=12).filter(lambda k: k != "__metadata__"),
)
dtypes = st.sampled_from(
    [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
)
shapes = st.sampled_from([(8,), (8,), (4,), (), (0,), (2, 3), (1, 1, 1)])
fills = st.sampled_from(["random", "random", "ones", "nan", "inf", "-inf", "zero", "negative", "tiny"])


def _tensor(shape, dtype, fill, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 4 + 0.1
    if fill == "ones":
        x = torch.ones(shape, dtype=torch.float64)
    elif fill in ("nan", "inf", "-inf", "zero") and x.numel():
        x.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "zero": 0.0}[fill]
    elif fill == "negative":
        x = -x
    elif fill == "tiny":
        x = x * 1e-30
    return x.to(dtype)


tensors = st.builds(_tensor, shapes, dtypes, fills, st.integers(0, 2**16))

HEADER_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "U16", "U32", "U64", "F8_E4M3", "C64", "XX", 3]


@st.composite
def handmade_safetensors(draw) -> bytes:
    """A safetensors file assembled by hand: 8-byte header length, a JSON header, a data buffer."""
    entries = {}
    for key in draw(st.lists(keys, max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(-1, 9), max_size=3))
        start = draw(st.integers(-4, 64))
        entries[key] = {
            "dtype": draw(st.sampled_from(HEADER_DTYPES)),
            "shape": shape,
            "data_offsets": [start, start + draw(st.integers(-4, 64))],
        }
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(json_values, st.dictionaries(st.text(max_size=5), st.text())))
    header = json.dumps(entries).encode()
    if draw(st.integers(0, 4)) == 0:
        header = draw(st.binary(max_size=40))
    length = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**40]))
    data = draw(st.binary(max_size=128))
    return struct.pack("<Q", max(length, 0)) + header + data


@st.composite
def scales_inputs(draw) -> dict:
    """What --scales points at: a file's bytes or tensors, as a file or in a folder, with or without search.json."""
    kind = draw(st.sampled_from(["tensors", "tensors", "tensors", "handmade", "bytes", "truncated"]))
    content: dict | bytes
    if kind == "tensors":
        content = draw(st.dictionaries(keys, tensors, max_size=4))
    elif kind == "handmade":
        content = draw(handmade_safetensors())
    elif kind == "bytes":
        content = draw(st.binary(max_size=64))
    else:
        content = {"scales.0.mlp": torch.ones(64), "scales.1.attn": torch.ones(64)}  # truncated after writing
    sidecar = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.just({"config": {"method": "qig", "wbits": 3}}),
            json_values,
            st.binary(max_size=16),
        )
    )
    return {
        "kind": kind,
        "content": content,
        "cut": draw(st.integers(1, 200)),
        "metadata": draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=2))),
        "where": draw(st.sampled_from(["file", "file", "folder", "nested-folder", "missing", "empty-folder"])),
        "sidecar": sidecar,
    }


def _materialize(case: dict, root: Path) -> Path:
    """Write the case under ``root``; returns the path given to load_scales."""
    folder = root / "run"
    folder.mkdir()
    target = (folder / "qig" if case["where"] == "nested-folder" else folder) / "search.safetensors"
    target.parent.mkdir(exist_ok=True)
    if case["where"] == "missing":
        return folder / "nope.safetensors"
    if case["where"] == "empty-folder":
        return folder
    if isinstance(case["content"], dict):
        try:
            save_file(case["content"], target, metadata=case["metadata"])
        except (ValueError, TypeError, RuntimeError):  # the library refuses to write some of them: write bytes
            target.write_bytes(b"")
        if case["kind"] == "truncated":
            target.write_bytes(target.read_bytes()[: case["cut"]])
    else:
        target.write_bytes(case["content"])
    sidecar = case["sidecar"]
    if sidecar is not None:
        data = sidecar if isinstance(sidecar, bytes) else json.dumps(sidecar).encode()
        (target.parent / "search.json").write_bytes(data)
    return target if case["where"] == "file" else folder


# ---------------------------------------------------------------- properties


def load_scales_ends_in_scales_or_an_error(case):
    """Any file, folder or missing path: (scales, config or None), or a QigError."""
    with tempfile.TemporaryDirectory(prefix="qig-fuzz-scales-") as tmp:
        out = ends_well(load_scales, _materialize(case, Path(tmp)))
    if out is not None:
        scales, config = out
        assert isinstance(scales, dict) and scales
        assert config is None or isinstance(config, dict)


def load_scales_returns_usable_scales(case):
    """What load_scales returns is usable: keys (layer >= 0, group name), values positive finite 1-D floats."""
    with tempfile.TemporaryDirectory(prefix="qig-fuzz-scales-") as tmp:
        out = ends_well(load_scales, _materialize(case, Path(tmp)))
    if out is None:
        return
    for (layer, group), value in out[0].items():
        assert isinstance(layer, int) and layer >= 0, f"layer {layer!r}"
        assert isinstance(group, str) and group and not group.startswith(".") and not group.endswith(".")
        assert value.dim() == 1 and value.numel() > 0, f"scales.{layer}.{group}: shape {tuple(value.shape)}"
        assert value.is_floating_point(), f"scales.{layer}.{group}: dtype {value.dtype}"
        assert torch.isfinite(value).all() and (value > 0).all(), f"scales.{layer}.{group}: {value}"


def _file(tensors: dict) -> dict:
    return {"kind": "tensors", "content": tensors, "cut": 1, "metadata": None, "where": "file", "sidecar": None}


FOUND_KEYS = (  # keys that escaped as ValueError (fixed in qig.runs)
    {"case": _file({"scales.0": torch.ones(4)})},
    {"case": _file({"scales.x.mlp": torch.ones(4)})},
)
FOUND_VALUES = (  # values once returned as if they were scales (fixed in qig.runs)
    {"case": _file({"scales.0.mlp": torch.tensor([1.0, float("nan")])})},
    {"case": _file({"scales.0.mlp": torch.tensor([1.0, 0.0])})},
    {"case": _file({"scales.0.mlp": -torch.ones(4)})},
    {"case": _file({"scales.-1.mlp": torch.ones(4)})},
    {"case": _file({"scales.0.mlp": torch.ones(2, 2)})},
    {"case": _file({"scales.0.mlp": torch.ones(0)})},
    {"case": _file({"scales.0.mlp": torch.ones(4, dtype=torch.bool)})},
    {"case": _file({"scales.0.mlp": torch.ones(4, dtype=torch.int8)})},
)

test_load_scales, test_load_scales_slow = fast_and_slow(case=scales_inputs(), examples=FOUND_KEYS, fast_examples=60)(
    load_scales_ends_in_scales_or_an_error
)
test_load_scales_values, test_load_scales_values_slow = fast_and_slow(
    case=scales_inputs(), examples=FOUND_KEYS + FOUND_VALUES
)(load_scales_returns_usable_scales)
