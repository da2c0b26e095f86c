"""Bytes of the quantized linears in an export, against their FP16 size (the size benchmark and its test).

>>> from qig.export.size import linear_bytes
>>> stored, fp16 = linear_bytes("out/qig-w4-ct")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def linear_bytes(folder: str | os.PathLike) -> tuple[int, int]:
    """(stored bytes, FP16 bytes) of every quantized linear's weight tensors in a compressed-tensors folder.

    A quantized linear is one with a ``weight_scale``; its stored tensors are
    ``weight_packed`` or ``weight``, ``weight_scale``, ``weight_zero_point`` and
    ``weight_shape``; its FP16 size is 2 bytes per weight. Biases are left out
    of both (they stay in full precision either way).
    """
    headers = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            headers.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    stored = fp16 = 0
    for key in headers:
        if not key.endswith(".weight_scale"):
            continue
        prefix = key[: -len("weight_scale")]
        parts = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        for part in parts:
            meta = headers.get(prefix + part)
            if meta is not None:
                start, end = meta["data_offsets"]
                stored += end - start
        shape = _weight_shape(folder, prefix, headers)
        fp16 += 2 * math.prod(shape)
    return stored, fp16


def _weight_shape(folder, prefix: str, headers: dict) -> list[int]:
    if prefix + "weight" in headers:
        return headers[prefix + "weight"]["shape"]
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            if prefix + "weight_shape" in st.keys():
                return [int(v) for v in st.get_tensor(prefix + "weight_shape").tolist()]
    raise KeyError(f"no weight or weight_shape for {prefix.rstrip('.')}")
