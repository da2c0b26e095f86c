"""Reading saved model folders (tensors, key names) and comparing state dicts bit for bit."""

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


def saved_keys(folder: Path) -> list[str]:
    """Every tensor name in the ``*.safetensors`` shards of ``folder``, sorted (reads the headers only)."""
    keys = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    return sorted(keys)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same names, dtypes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
