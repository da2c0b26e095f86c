"""Named quantization settings, as users know them from llm-compressor's presets (data, STYLE.md rule 6).

A scheme names a weight spec and an activation spec (None: weight-only); the
flags ``--wbits/--abits/--group-size`` resolve to the integer settings, a
scheme to these (``qig.methods.config`` does the resolving).

    >>> SCHEMES["NVFP4"].weights.label(), SCHEMES["NVFP4"].activations.label()
    ('W4 g16 nvfp4', 'A4 per-token g16 nvfp4 dynamic')
    >>> SCHEMES["W4AFP8"].abits
    8
"""

from __future__ import annotations

from dataclasses import dataclass

from qig.errors import QigError
from qig.quant.spec import QuantSpec, activation_spec


@dataclass(frozen=True)
class Scheme:
    """A named setting: its weight quantizer, its activation quantizer (None: weight-only), what it is for."""

    weights: QuantSpec
    activations: QuantSpec | None
    note: str

    @property
    def abits(self) -> int:
        """Activation bits, 16 for weight-only (the ``--abits`` a scheme resolves to)."""
        return 16 if self.activations is None else self.activations.bits


def _int(bits: int, group: int | None, symmetric: bool = True) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=group, symmetric=symmetric)


SCHEMES: dict[str, Scheme] = {
    "W4A16": Scheme(_int(4, 128), None, "int4 weights, symmetric, g128 (Marlin / Machete)"),
    "W4A16_ASYM": Scheme(_int(4, 128, symmetric=False), None, "int4 weights with zero points, g128"),
    "W8A16": Scheme(_int(8, 128), None, "int8 weights, symmetric, g128"),
    "W8A8": Scheme(_int(8, None), activation_spec(8), "int8 weights per channel, int8 activations per token"),
    "FP8_DYNAMIC": Scheme(
        QuantSpec(8, None, True, number="fp8"), activation_spec(8, "fp8"), "FP8 weights per channel and tokens"
    ),
    "W4AFP8": Scheme(_int(4, 128), activation_spec(8, "fp8"), "int4 weights g128, FP8 activations per token"),
    "NVFP4A16": Scheme(QuantSpec(4, 16, True, number="nvfp4"), None, "NVFP4 weights (FP4, FP8 scales per 16)"),
    "NVFP4": Scheme(
        QuantSpec(4, 16, True, number="nvfp4"), activation_spec(4, "nvfp4"), "NVFP4 weights and activations"
    ),
    "MXFP4A16": Scheme(QuantSpec(4, 32, True, number="mxfp4"), None, "MXFP4 weights (FP4, power-of-2 scales per 32)"),
    "MXFP4": Scheme(
        QuantSpec(4, 32, True, number="mxfp4"), activation_spec(4, "mxfp4"), "MXFP4 weights and activations"
    ),
}


def scheme_names() -> tuple[str, ...]:
    """The ``--scheme`` choices."""
    return tuple(SCHEMES)


def scheme_named(name: str) -> Scheme:
    """The scheme called ``name`` (case-insensitive), refused in one line otherwise."""
    scheme = SCHEMES.get(str(name).upper())
    if scheme is None:
        raise QigError(f"scheme {name!r} is not supported; use one of: {', '.join(SCHEMES)}")
    return scheme
