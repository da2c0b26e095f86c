"""Which compressed-tensors scheme holds a qig setting, and what can serve it.

The mapping is data (STYLE.md rule 6): a qig weight spec plus the activation
bits give the compressed-tensors ``QuantizationScheme`` fields and its storage
format; a setting the format cannot hold is refused before anything is
written.

    >>> from qig.quant.spec import QuantSpec
    >>> s = scheme_for(QuantSpec(bits=4, group_size=128), abits=16)
    >>> s.format, s.weights["strategy"], s.weights["symmetric"]
    ('pack-quantized', 'group', False)
    >>> scheme_for(QuantSpec(bits=8, group_size=None, symmetric=True), abits=8).format
    'int-quantized'
"""

from __future__ import annotations

from dataclasses import dataclass

from qig.errors import QigError
from qig.quant.spec import QuantSpec

ACTIVATION_BITS = (4, 8, 16)  # 16: weight-only


@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors scheme: weight and input-activation arguments, storage format, serving note."""

    format: str  # "pack-quantized" (weight-only, packed int32) or "int-quantized" (int8 storage, W-A)
    weights: dict
    input_activations: dict | None
    serving: str  # what vLLM does with it, as far as its source says (not run here)

    def quantization_scheme(self, targets: list[str]):
        """The compressed-tensors ``QuantizationScheme`` (needs the ``export`` extra)."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        acts = QuantizationArgs(**self.input_activations) if self.input_activations else None
        return QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**self.weights), input_activations=acts, format=self.format
        )


def scheme_for(spec: QuantSpec, abits: int = 16) -> Scheme:
    """The scheme of weights quantized by ``spec`` with ``abits``-bit per-token dynamic activations (16: none)."""
    if abits not in ACTIVATION_BITS:
        raise QigError(
            f"activation bits {abits} cannot be exported: compressed-tensors' integer schemes use per-token "
            f"dynamic activations of 4 or 8 bits (or none, 16); use --format fake-quant for other settings"
        )
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "group" if spec.group_size else "channel",
        "group_size": spec.group_size,
        "dynamic": False,
    }
    if abits == 16:
        return Scheme("pack-quantized", weights, None, _weight_only_note(spec))
    acts = {"num_bits": abits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return Scheme("int-quantized", weights, acts, _weight_activation_note(spec, abits))


def _weight_only_note(spec: QuantSpec) -> str:
    if spec.symmetric:
        if spec.bits in (4, 8):
            return f"vLLM: W{spec.bits}A16 (CompressedTensorsWNA16, Marlin/Machete kernels on NVIDIA GPUs)"
        return (
            f"vLLM: symmetric W{spec.bits}A16 only in versions whose WNA16 scheme lists {spec.bits} bits "
            "(older ones serve 4 and 8 only)"
        )
    if spec.bits in (4, 8):
        return f"vLLM: W{spec.bits}A16 with zero points (CompressedTensorsWNA16 asymmetric, Marlin on NVIDIA GPUs)"
    return (
        "vLLM cannot serve it: zero points (asymmetric weights) are supported at 4 and 8 bits only; "
        "transformers loads it (dequantized at load) and 'qig eval' evaluates it"
    )


def _weight_activation_note(spec: QuantSpec, abits: int) -> str:
    if abits == 8 and spec.bits == 8 and spec.symmetric and spec.group_size is None:
        return "vLLM: W8A8 int8 (CompressedTensorsW8A8Int8, dynamic per-token; CUTLASS on NVIDIA GPUs, also CPU)"
    if abits == 8 and spec.bits == 4 and spec.symmetric:
        return (
            "vLLM: W4A8 int (CompressedTensorsW4A8Int): kernels for CPUs only (Arm dynamic 4-bit); no NVIDIA GPU path"
        )
    return f"vLLM has no integer W{spec.bits}A{abits} scheme; transformers loads it (activations fake-quantized)"
