"""Saving a model in its family's serving key layout: the one way qig writes model weights.

``save_pretrained`` writes the keys transformers chooses; vLLM's loader for a
family may want others (a CLIP or SigLIP tower's ``vision_model.`` level,
``qig.models.families.CLIP_SIGLIP_TOWER``). :func:`save_model` saves, then
renames the keys of the saved shards by the family's ``serving_keys`` rules;
transformers loads the result into the same model.

    >>> from qig.models.layout import save_model
    >>> save_model(model, "out/tmp-folder")  # doctest: +SKIP
    12
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from qig.errors import QigError
from qig.models.family import ModelFamily

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"  # the shard index transformers writes for sharded checkpoints


def save_model(model: torch.nn.Module, folder: str | os.PathLike, family: ModelFamily | None = None, **kwargs) -> int:
    """``model.save_pretrained(folder, **kwargs)``, then the saved keys in the family's serving layout.

    family: the model's entry (default: ``family_for(model)``). Returns the
    number of keys renamed. ``folder`` should be a temporary folder that is
    renamed into place afterwards (``qig.fileio.atomic_dir``): the shards are
    rewritten in it.
    """
    if family is None:
        from qig.models.families import family_for

        family = family_for(model)
    model.save_pretrained(folder, **kwargs)
    return apply_layout(folder, family)


def apply_layout(folder: str | os.PathLike, family: ModelFamily) -> int:
    """Rename the keys of every ``*.safetensors`` shard in ``folder`` (and its index) to the family's layout.

    A shard with keys to rename is rewritten next to itself and moved over it
    (``os.replace``); its tensors and its metadata are kept byte for byte, only
    the names change. Returns the number of keys renamed.

    >>> from qig.models import FAMILIES
    >>> apply_layout("out/tmp-folder", FAMILIES[0])  # doctest: +SKIP
    32
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    if not family.serving_keys:
        return 0
    renamed = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            names = {k: family.serving_key(k) for k in keys}
            if all(k == v for k, v in names.items()):
                continue
            tensors = {names[k]: f.get_tensor(k) for k in keys}
            metadata = f.metadata()
        if len(set(tensors)) != len(keys):
            raise QigError(f"{shard}: the serving layout of {family.name} maps two keys to one name; fix its rules")
        tmp = shard.with_name(f".{shard.name}.layout")
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, shard.stat().st_mode & 0o777)  # save_file makes a private file; keep the shard's mode
        os.replace(tmp, shard)
        renamed.update({k: v for k, v in names.items() if k != v})
    index = folder / INDEX
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data.get("weight_map", {}).items()}
        tmp = index.with_name(f".{index.name}.layout")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, index.stat().st_mode & 0o777)
        os.replace(tmp, index)
    if renamed:
        log.debug("%s: %d keys in the %s serving layout", folder, len(renamed), family.name)
    return len(renamed)


def save_streamed(model: torch.nn.Module, folder: str | os.PathLike, family: ModelFamily, read_layer) -> int:
    """``save_model`` for a model whose decoder layers are not in memory: one shard per layer, read in turn.

    ``read_layer(index)`` gives a finished layer's state (names inside the layer).
    Everything else is what ``save_pretrained`` writes for the model without its
    decoder layers (config, generation config, the other weights, tied weights
    dropped as usual), put in the first shard; layer l goes to shard l + 2, cast
    to the dtype the model's (meta) layer has, its keys reverted to the
    checkpoint names as ``save_pretrained`` reverts them and put in the serving
    layout. An index names every shard, as ``save_pretrained`` writes one.
    Host memory: the non-decoder weights and one layer.
    """
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    from qig.hostmem import trim
    from qig.models.checkpoint import read_header

    folder = Path(folder)
    layers = family.decoder_layers(model)
    save_without_decoder(model, family, folder)
    total = len(layers) + 1
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    rest = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if (folder / INDEX).is_file():
        raise QigError("the model outside its decoder needs several shards; streamed saving supports one")
    size = 0
    for path in rest:
        header = read_header(path)
        weight_map.update({k: shard_name(1, total) for k in header})
        size += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        os.replace(path, folder / shard_name(1, total))
    for li, layer in enumerate(layers):
        dtypes = {k: t.dtype for k, t in layer.state_dict().items()}
        state = read_layer(li)
        full = {f"{family.layers}.{li}.{k}": v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in state.items()}
        tensors = {family.serving_key(k): v for k, v in revert_weight_conversion(model, full).items()}
        path = folder / shard_name(li + 2, total)
        save_file(tensors, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())
        weight_map.update({k: path.name for k in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del state, full, tensors
        trim()  # one layer at a time: give it back before the next
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return apply_layout(folder, family)


def save_in_parts(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    family: ModelFamily,
    parts: Sequence[str | os.PathLike],
    max_shard_size: int | str = "50GB",
) -> int:
    """What ``save_model(model, folder, family, max_shard_size=...)`` writes, byte for byte, from a streamed model.

    ``model``'s decoder layers are on the meta device, with the structure their
    saved tensors have; ``parts[l]`` is a safetensors file with layer l's tensors
    under the names ``save_pretrained`` gives them (full, reverted to the
    checkpoint's names, see :func:`layer_state`). The rest of the model is saved
    by ``save_pretrained`` (config files, its tensors); then the shards are
    planned as ``save_pretrained`` plans them (the model's state dict with meta
    decoder tensors, tied weights removed, names reverted, split by
    ``huggingface_hub``) and written one tensor at a time
    (``qig.models.shards``), in the family's serving layout, with an index
    when there are several. Host memory: the rest of the model and one tensor.
    Returns the number of keys renamed to the serving layout.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from qig.models.checkpoint import read_header

    folder = Path(folder)
    rest = folder / ".rest"
    save_without_decoder(model, family, rest, max_shard_size=2**62)  # one file: its tensors are read back in turn
    for f in rest.iterdir():
        if f.name != "model.safetensors":
            os.replace(f, folder / f.name)
    sources = {k: rest / "model.safetensors" for k in read_header(rest / "model.safetensors")}
    for part in map(Path, parts):
        sources.update({k: part for k in read_header(part)})
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    if set(state) != set(sources):
        extra = sorted(set(state) ^ set(sources))[:3]
        raise QigError(
            f"the streamed layers hold other tensors than the model saves (e.g. {extra}); please report this"
        )
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    _write_shards(folder, family, state, sources, split.filename_to_tensors)
    if split.is_sharded:
        weight_map = {family.serving_key(k): v for k, v in split.tensor_to_filename.items()}
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (rest / "model.safetensors").unlink()
    rest.rmdir()
    return sum(family.serving_key(k) != k for k in state)


def _write_shards(folder: Path, family: ModelFamily, state: dict, sources: dict, shards: dict[str, list[str]]) -> None:
    """Each planned shard (file name -> saved names), its tensors read one at a time from ``sources[name]`` and
    written under their serving names (``qig.models.shards``)."""
    from safetensors import safe_open

    from qig.models.shards import Entry, write_file

    saved_as = {family.serving_key(n): n for n in state}

    def read(serving: str) -> torch.Tensor:
        key = saved_as[serving]
        with safe_open(sources[key], "pt") as f:
            return f.get_tensor(key)

    for shard, names in shards.items():
        entries = [Entry(family.serving_key(n), state[n].dtype, tuple(state[n].shape)) for n in names]
        write_file(folder / shard, entries, read)
        os.chmod(folder / shard, 0o666 & ~_umask())


def save_without_decoder(model: torch.nn.Module, family: ModelFamily, folder: Path, **kwargs) -> None:
    """``model.save_pretrained(folder, **kwargs)`` with the decoder layers out of the model for the call."""
    from qig.models.family import get_module

    layers = get_module(model, family.layers)
    parent, _, name = family.layers.rpartition(".")
    holder = get_module(model, parent)
    setattr(holder, name, torch.nn.ModuleList())
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        setattr(holder, name, layers)


def layer_state(model: torch.nn.Module, family: ModelFamily, index: int, layer: torch.nn.Module) -> dict:
    """Decoder layer ``index``'s tensors under the names ``save_pretrained`` writes them (for :func:`save_in_parts`)."""
    from transformers.core_model_loading import revert_weight_conversion

    full = {f"{family.layers}.{index}.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    return revert_weight_conversion(model, full)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
