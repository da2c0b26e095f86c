"""Comparing saved model folders and state dicts bit for bit (the tests of streaming and resume)."""

from pathlib import Path

import torch
from safetensors import safe_open


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model shards (``model*.safetensors``), by name."""
    out = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same names, dtypes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
