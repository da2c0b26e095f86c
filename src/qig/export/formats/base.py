"""What an export format is, and the registry that names them.

A format is one class: a ``name`` (the ``--format`` value), a one-line
``help``, :meth:`ExportFormat.check` that refuses a setting it cannot hold
before any work, and three steps the shared flow (``qig.export.writer``) calls:
:meth:`ExportFormat.begin` once (the model's decoder layers may still be on the
meta device), :meth:`ExportFormat.write_layer` for each decoder layer while it
is in memory (it changes the layer's modules into what the format stores), and
:meth:`ExportFormat.end` once the weights are saved. The flow saves the weights
(the whole model, or layer by layer for a model streamed from disk), the
processor and the run files, and checks what an integer format stored.
``@register`` makes it a ``qig export --format`` choice.

    >>> from qig.export.formats import format_for, format_names
    >>> format_names()
    ('compressed-tensors', 'fake-quant')
    >>> format_for("fake-quant").help
    'dequantized weights in the model dtype (transformers, qig eval)'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from qig.errors import QigError
from qig.export.params import QuantizedWeight
from qig.models.family import ModelFamily
from qig.quant.spec import QuantSpec


@dataclass
class Run:
    """What ``qig quantize`` left in a folder: the saved config, its weight and activation specs (None:
    weight-only), the quantizer parameters per ``"<layer>.<linear>"`` (``qig.quant.stored``; empty for folders that
    kept none)."""

    path: Path
    config: dict
    spec: QuantSpec
    act_spec: QuantSpec | None
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    """What a format tells the summary about the folder it wrote: its storage layout and what serves it."""

    layout: str | None = None  # e.g. "pack-quantized"
    serving: str | None = None  # e.g. "vLLM: W4A16 with zero points (CompressedTensorsWNA16): ..."


class ExportFormat:
    """Base class: one export format. Subclasses set ``name`` and ``help`` and implement :meth:`write_layer`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    # The flow saves the model's tensors after write_layer (the whole model, or layer by layer for a streamed one);
    # False: the format writes its own files in end.
    saves_model: ClassVar[bool] = True

    def check(self, spec: QuantSpec, act_spec: QuantSpec | None = None, act_order: bool = False) -> None:
        """Refuse, in one line and before any work, a setting this format cannot hold; default: any is held.

        act_order: the run is GPTQ with act-order (its groups follow a column permutation).
        """

    def begin(self, model: torch.nn.Module, *, family: ModelFamily, run: Run, linears: list[str], ignored: list[str]):
        """Before any layer: prepare ``model`` (its decoder layers may be on the meta device); default: nothing.

        linears: the decoder linears that will be quantized (model paths); ignored:
        the linears kept in full precision.
        """

    def write_layer(self, model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
        """Turn the decoder linears in ``quantized`` (one layer's, in memory) into what the format stores.

        quantized: per linear (model path) its exact codes and parameters. Refuse
        codes the format cannot store before changing anything.
        """
        raise NotImplementedError

    def end(self, folder: Path) -> Written:
        """After the weights are saved in ``folder``: the format's remaining files; what was written."""
        return Written()

    def stored_codes(self, module: torch.nn.Module, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After :meth:`write_layer`: (the integers ``module`` holds, the codes they must equal); None: none held."""
        return None


_REGISTRY: dict[str, type[ExportFormat]] = {}  # filled by register, in import order


def register(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: ``@register class FP8(ExportFormat): name = "fp8" ...``; the name joins ``--format``."""
    if not cls.name:
        raise QigError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def format_names() -> tuple[str, ...]:
    """The registered formats' names, in registration order (the ``--format`` choices)."""
    return tuple(_REGISTRY)


def format_for(name: str) -> ExportFormat:
    """The format registered as ``name``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise QigError(f"format {name!r} is not supported; use one of: {', '.join(_REGISTRY)}")
    return cls()
