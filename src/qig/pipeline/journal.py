"""What each finished layer left behind, kept on disk as the run goes: resume, and a streamed model's output.

After the layer loop finishes layer l, :meth:`Journal.save_layer` writes, into
the run's work folder, atomically:

- ``layer-0000l.safetensors``: the layer's finished state (its quantized
  weights, folded norms, in the dtype the run computes in), the quantizer's
  parameters of its linears (``quantized.<linear>.*``), and per group the
  scale and token weights the loop recorded (``group.<name>.*``);
- ``layer-0000l.json``: the rest of the groups' records (ratio, losses,
  token-weight statistics, notes) and the layer's GPTQ seconds.

``fingerprint.json``, written first, says what the results belong to (the
model, the calibration data, the config and the run's options); a journal with
another fingerprint is refused with what differs. :meth:`Journal.replay`
gives a finished layer back to the loop, which re-folds the saved scales into
the source layer (x through it), loads the finished state (x^q through it),
and goes on: no search, and the same bits as the run that was interrupted.

    >>> journal = Journal.open("out/run.partial", fingerprint)  # doctest: +SKIP
    >>> journal.finished()  # doctest: +SKIP
    [0, 1, 2]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qig.errors import QigError
from qig.fileio import atomic_write_bytes, atomic_write_text
from qig.pipeline.result import GroupRecord

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
FORMAT = "qig-journal-1"


def layer_file(folder: Path, index: int, suffix: str) -> Path:
    return folder / f"layer-{index:05d}.{suffix}"


@dataclass
class FinishedLayer:
    """One finished layer as the journal keeps it."""

    index: int
    state: dict[str, torch.Tensor]  # the layer's state_dict, finished (names inside the layer)
    quantized: dict[str, dict[str, torch.Tensor]]  # "layer.linear" -> the quantizer's parameters
    records: list[GroupRecord] = field(default_factory=list)
    gptq_seconds: float | None = None

    def scales(self) -> list[tuple[str, torch.Tensor]]:
        """The groups' folded scales, in the order they were folded."""
        return [(r.group, r.scales) for r in self.records if r.scales is not None]


class Journal:
    """The work folder of one run: its fingerprint and one pair of files per finished layer."""

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    @classmethod
    def open(cls, folder: str | os.PathLike, fingerprint: dict, resume: bool = False) -> Journal:
        """A new journal in ``folder`` (which must not hold finished layers), or, with ``resume``, the one there.

        Resuming refuses a journal whose fingerprint differs from ``fingerprint``, naming the
        entries that differ.
        """
        folder = Path(folder)
        saved_path = folder / FINGERPRINT
        if resume:
            if not saved_path.is_file():
                raise QigError(f"there is no partial run to resume in {folder}; run without --resume to start one")
            try:
                saved = json.loads(saved_path.read_text())
            except (OSError, ValueError) as exc:
                raise QigError(f"{saved_path} is unreadable ({exc}); remove {folder} and start again") from exc
            differs = _differences(saved, fingerprint)
            if differs:
                raise QigError(
                    f"the partial run in {folder} was made with other inputs, so it cannot be resumed: "
                    + "; ".join(differs)
                    + f". Run it again with the same ones, or remove {folder} to start over"
                )
            return cls(folder, fingerprint)
        if saved_path.exists() and cls(folder, fingerprint).finished():
            raise QigError(
                f"{folder} holds a partial run ({len(cls(folder, fingerprint).finished())} layers finished); pass "
                f"--resume to continue it, or remove {folder} to start over"
            )
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, json.dumps({"format": FORMAT, **fingerprint}, indent=1, sort_keys=True) + "\n")
        return cls(folder, fingerprint)

    def finished(self) -> list[int]:
        """The layers whose results are complete (both files written), in order."""
        done = []
        for path in sorted(self.folder.glob("layer-*.json")):
            index = int(path.stem.split("-")[1])
            if layer_file(self.folder, index, "safetensors").is_file():
                done.append(index)
        return done

    def save_layer(self, layer: FinishedLayer) -> None:
        """Write one finished layer: the tensors first, the JSON last (its presence marks the layer done)."""
        from safetensors.torch import save

        tensors = {f"state.{k}": v.detach().contiguous() for k, v in layer.state.items()}
        for name, params in layer.quantized.items():
            tensors.update({f"quantized.{name}.{k}": v.contiguous() for k, v in params.items()})
        meta = []
        for r in layer.records:
            if r.scales is not None:
                tensors[f"group.{r.group}.scales"] = r.scales.contiguous()
            if r.token_weights is not None:
                tensors[f"group.{r.group}.token_weights"] = r.token_weights.contiguous()
            for path, ratios in r.clips.items():
                tensors[f"group.{r.group}.clip.{path}"] = ratios.contiguous()
            meta.append(r.to_json())
        atomic_write_bytes(layer_file(self.folder, layer.index, "safetensors"), save(tensors, {"format": FORMAT}))
        info = {"layer": layer.index, "groups": meta, "gptq_seconds": layer.gptq_seconds}
        atomic_write_text(layer_file(self.folder, layer.index, "json"), json.dumps(info, indent=1) + "\n")

    def load_layer(self, index: int, device: torch.device | str = "cpu") -> FinishedLayer:
        """A finished layer back from its files (tensors onto ``device``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = layer_file(self.folder, index, "safetensors")
        try:
            tensors = load_file(path, device=str(device))
            info = json.loads(layer_file(self.folder, index, "json").read_text())
        except (OSError, ValueError, SafetensorError) as exc:
            raise QigError(f"{path} is unreadable ({exc}); remove {self.folder} and start again") from exc
        state = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
        quantized: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("quantized."):
                name, _, param = key[len("quantized.") :].rpartition(".")
                quantized.setdefault(name, {})[param] = value
        records = [
            GroupRecord.from_json(
                {**g, "layer": index},
                _cpu(tensors.get(f"group.{g['group']}.scales")),
                _cpu(tensors.get(f"group.{g['group']}.token_weights")),
                {
                    k[len(f"group.{g['group']}.clip.") :]: v.cpu()
                    for k, v in tensors.items()
                    if k.startswith(f"group.{g['group']}.clip.")
                },
            )
            for g in info["groups"]
        ]
        return FinishedLayer(index, state, quantized, records, info.get("gptq_seconds"))


class JournalIndex:
    """A streamed model's decoder layers once the run is done: read from the journal's finished states.

    The same reading interface as ``qig.models.checkpoint.CheckpointIndex``, so the
    layers load from here as they loaded from the source checkpoint (``qig eval`` in
    the same process, the streamed save).
    """

    quantized = True  # the layers it reads are the run's finished ones

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix

    def read_layer(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(layer_file(self.folder, index, "safetensors"), "pt", device=str(device)) as f:
            return {k[len("state.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")}

    def read_prefix(self, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
        index = int(prefix[len(self.prefix) + 1 :].rstrip("."))
        return self.read_layer(index, "cpu" if device.type == "meta" else device)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words ("config.wbits: 3 then, 4 now")."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "format":
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key}: {_short(a)} then, {_short(b)} now")
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint(model: torch.nn.Module, calib, config, run: dict | None = None) -> dict:
    """What a run's results depend on, as a JSON-able dict (compared on resume).

    model: its config and, for a checkpoint on disk, every shard's name, size and
    header digest (the tensors' names, dtypes, shapes and offsets; not their bytes);
    for a model in memory, a digest of its first and last decoder layers' weights.
    calib: a digest of every sample's inputs and roles. config: its fields.
    run: the run's options that change results (dtype, device).
    """
    import hashlib

    from qig.models import family_for
    from qig.models.checkpoint import STREAMED

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            t = t.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]

    cfg = getattr(model, "config", None)
    model_part: dict = {"config": hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:16] if cfg else None}
    index = getattr(model, STREAMED, None)
    if index is not None and not index.quantized:  # the source checkpoint's shards
        from qig.models.checkpoint import shard_files

        shards = {}
        for shard in shard_files(index.folder):
            with shard.open("rb") as f:
                head = f.read(8)
                shards[shard.name] = [
                    shard.stat().st_size,
                    hashlib.sha256(f.read(int.from_bytes(head, "little"))).hexdigest()[:16],
                ]
        model_part.update(folder=str(index.folder.resolve()), shards=shards)
    else:
        layers = family_for(model).decoder_layers(model)
        model_part["weights"] = digest([*layers[0].state_dict().values(), *layers[-1].state_dict().values()])
    samples = [t for s in calib.samples for t in (*s.inputs.values(), s.roles)] if calib is not None else []
    return {
        "model": model_part,
        "calibration": {"samples": len(calib) if calib is not None else 0, "digest": digest(samples)},
        "config": config.to_dict(),
        "run": run or {},
    }


def partial_dir(output: str | os.PathLike) -> Path:
    """Where a run keeps its finished layers until its output is written: OUTPUT.partial beside it."""
    out = Path(output)
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def keeping_partial(work: Path):
    """If the run stops here, the CLI says where its finished layers are and how to go on (none: nothing is kept)."""
    from qig import fileio

    try:
        yield
    except BaseException:
        done = sorted(work.glob("layer-*.json")) if work.is_dir() else []
        if done:
            fileio.note_resumable(
                work,
                f"the {len(done)} finished layers are kept in {work}; run the same command with --resume to "
                f"continue from there (or remove {work} to start over)",
            )
        else:
            remove_partial(work)  # only a fingerprint: nothing to resume from
        raise


def remove_partial(work: Path) -> None:
    """Remove a run's work folder once its output is written (or when it holds no finished layer)."""
    import shutil

    from qig import fileio

    try:
        shutil.rmtree(work)
    except FileNotFoundError:  # not made, or removed by another rank of the same run
        pass
    fileio.forget_resumable(work)
