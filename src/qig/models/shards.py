"""Writing a safetensors file one tensor at a time, with the bytes ``safetensors.torch.save_file`` writes.

``save_file`` needs every tensor of a file in memory at once: for a shard of a
72B checkpoint that is tens of GiB. :func:`write_file` takes the tensors' names,
dtypes and shapes up front (the header says where each one goes), then asks for
each tensor in turn and writes it at its offset, so host memory holds one
tensor. The file is byte for byte the one ``save_file`` writes for the same
tensors and ``{"format": "pt"}`` metadata (tests), so a streamed export equals an
in-memory one.

The format (safetensors 0.4 to 0.8): an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8 bytes, then the tensors'
bytes, ordered by dtype (the library's dtype order, largest first) and then by
name; the header lists ``__metadata__`` first and the tensors in data order.

    >>> import torch
    >>> entries = [Entry("b", torch.float32, (2,)), Entry("a", torch.int8, (3,))]
    >>> [e.name for e in data_order(entries)]
    ['b', 'a']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.errors import QigError

# The safetensors dtype names, in the library's order (its Rust ``Dtype`` enum); data is written largest first.
DTYPES: tuple[tuple[torch.dtype | None, str], ...] = (
    (torch.bool, "BOOL"),
    (None, "F4"),
    (None, "F6_E2M3"),
    (None, "F6_E3M2"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (getattr(torch, "float8_e8m0fnu", None), "F8_E8M0"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
)
_NAME = {dt: name for dt, name in DTYPES if dt is not None}
_RANK = {dt: i for i, (dt, _) in enumerate(DTYPES) if dt is not None}
METADATA = {"format": "pt"}  # what transformers' save_pretrained writes in every shard


@dataclass(frozen=True)
class Entry:
    """One tensor of a file to write: its name, dtype and shape (the data comes later)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def data_order(entries: Sequence[Entry]) -> list[Entry]:
    """The order safetensors writes tensors in: by dtype, largest first in its order, then by name."""
    for e in entries:
        if e.dtype not in _RANK:
            raise QigError(f"{e.name}: safetensors has no dtype for {e.dtype}")
    return sorted(entries, key=lambda e: (-_RANK[e.dtype], e.name))


def header(entries: Sequence[Entry], metadata: dict[str, str] | None = METADATA) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding ``entries``, as safetensors writes them.

    metadata: at most one key (safetensors writes several in no fixed order).
    """
    if metadata is not None and len(metadata) > 1:
        raise QigError("a streamed safetensors file takes at most one metadata key (the library orders several freely)")
    parts = []
    if metadata is not None:
        parts.append(f'"__metadata__":{_json(metadata)}')
    offset = 0
    for e in data_order(entries):
        info = {"dtype": _NAME[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        parts.append(f"{_json(e.name)}:{_json(info)}")
        offset += e.nbytes
    text = ("{" + ",".join(parts) + "}").encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_file(
    path: str | os.PathLike,
    entries: Sequence[Entry],
    read: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = METADATA,
) -> None:
    """Write ``entries`` to ``path`` as one safetensors file, asking ``read(name)`` for each tensor in turn.

    Each tensor must have its entry's dtype and shape; it is dropped once written.
    """
    with Path(path).open("wb") as f:
        f.write(header(entries, metadata))
        for e in data_order(entries):
            t = read(e.name)
            if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                raise QigError(
                    f"{e.name}: expected {e.dtype} {list(e.shape)}, got {t.dtype} {list(t.shape)} while writing {path}"
                )
            if e.nbytes:
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
