"""What an export format is, and the registry that names them.

A format is one class: a ``name`` (the ``--format`` value), a one-line
``help``, :meth:`ExportFormat.check` that refuses a setting it cannot hold
before any work, and :meth:`ExportFormat.write` that writes the model into a
folder. ``@register`` makes it a ``qig export --format`` choice; the shared
flow (``qig.export.writer``) reads the run, computes the integer codes, saves
the processor and the run files, and checks what an integer format stored.

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
    """Base class: one export format. Subclasses set ``name`` and ``help`` and implement :meth:`write`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    def check(self, spec: QuantSpec, act_spec: QuantSpec | None = None, act_order: bool = False) -> None:
        """Refuse, in one line and before any work, a setting this format cannot hold; default: any is held.

        act_order: the run is GPTQ with act-order (its groups follow a column permutation).
        """

    def write(
        self,
        model: torch.nn.Module,
        *,
        family: ModelFamily,
        run: Run,
        quantized: dict[str, QuantizedWeight],
        ignored: list[str],
        folder: Path,
    ) -> Written:
        """Write ``model`` into the empty ``folder`` (the processor and the run files are added by the caller).

        quantized: per decoder linear (model path) its exact codes and parameters;
        ignored: the linears kept in full precision. The model may be changed in
        place. Refuse codes the format cannot store before writing a file.
        """
        raise NotImplementedError

    def stored_codes(self, module: torch.nn.Module, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After :meth:`write`: (the integers ``module`` holds, the codes they must equal); None: it holds none."""
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
