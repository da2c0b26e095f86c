"""A checkpoint's tensors by the model's own parameter names: where each decoder layer's weights are on disk.

A safetensors checkpoint names its tensors as it was saved (e.g. LLaVA's
``language_model.model.layers.3...``); the model built from its config names
them its own way (``model.language_model.layers.3...``). transformers maps one
to the other while loading; :class:`CheckpointIndex` applies the same renaming
(``transformers.core_model_loading.rename_source_key`` with the model's
conversion mapping) to every key of the shards' headers, so a decoder layer's
tensors can be read on their own, when the layer loop reaches it. Only the
headers are read up front.

    >>> index = CheckpointIndex.read("llava-7b", model, meta_state, "model.language_model.layers")  # doctest: +SKIP
    >>> tensors = index.read_prefix("model.language_model.layers.3.", torch.device("cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from qig.errors import QigError

INDEX = "model.safetensors.index.json"
STREAMED = "qig_checkpoint"  # the attribute of a streamed model holding where its decoder layers are read from


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder: those its index names, else every ``*.safetensors``."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QigError(f"{index} is not a readable shard index ({exc}); the checkpoint is corrupt") from exc
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_header(shard: Path) -> dict:
    """A safetensors file's header (names, dtypes, shapes, offsets), read without the tensors."""
    try:
        with shard.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > shard.stat().st_size - 8:  # a corrupt length would have us read that many bytes
                raise ValueError(f"its header length {n} passes the file's {shard.stat().st_size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise QigError(f"{shard} is not a readable safetensors file: {exc}") from exc
    header.pop("__metadata__", None)
    return header


@dataclass
class CheckpointIndex:
    """Model parameter name -> (shard, name in the shard), for the parameters under ``prefix``.

    A streamed model's layer source before its run: the source checkpoint's layers
    (``quantized`` False); after the run ``qig.pipeline.journal.JournalIndex``
    (``quantized`` True) reads the finished layers through the same ``read_prefix``.
    """

    folder: Path
    prefix: str
    where: dict[str, tuple[Path, str]] = field(default_factory=dict)
    quantized: ClassVar[bool] = False  # the layers it reads are the source's

    @classmethod
    def read(cls, folder: str | os.PathLike, model: torch.nn.Module, meta_state: dict, prefix: str) -> CheckpointIndex:
        """Index the shards of ``folder`` by ``model``'s parameter names (``meta_state``: the full model's)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        folder = Path(folder)
        shards = shard_files(folder)
        if not shards:
            raise QigError(f"{folder} holds no safetensors shards; streaming the layers from disk needs them")
        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        index = cls(folder, prefix)
        for shard in shards:
            for key in read_header(shard):
                name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
                if not name.startswith(prefix + "."):
                    continue
                if converted is not None:
                    raise QigError(
                        f"{shard.name}: {key} is converted while loading (transformers merges or splits it), so a "
                        "layer cannot be read on its own; load the whole model instead (--model-offload none)"
                    )
                index.where[name] = (shard, key)
        wanted = {k for k in meta_state if k.startswith(prefix + ".")}
        missing = sorted(wanted - set(index.where))
        if missing:
            raise QigError(
                f"{folder} lacks {len(missing)} decoder tensors the model needs (e.g. {missing[0]}); "
                "the checkpoint is incomplete or of another model"
            )
        return index

    def read_prefix(self, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
        """Every indexed tensor under ``prefix`` (names relative to it), read from its shard onto ``device``."""
        from safetensors import SafetensorError, safe_open

        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for name, (shard, key) in self.where.items():
            if name.startswith(prefix):
                by_shard.setdefault(shard, []).append((name[len(prefix) :], key))
        out = {}
        target = "cpu" if device.type == "meta" else str(device)
        for shard, items in by_shard.items():
            try:
                with safe_open(shard, "pt", device=target) as f:
                    for rel, key in items:
                        out[rel] = f.get_tensor(key)
            except (OSError, SafetensorError) as exc:
                raise QigError(f"could not read {shard}: {exc}; the checkpoint changed or is corrupt") from exc
        return out
