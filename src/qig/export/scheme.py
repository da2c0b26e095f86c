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
    serving: str  # what vLLM 0.32 does with it: its source, and the CPU runs of scripts/check_vllm.sh

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


# What vLLM 0.32 does with each scheme, read from its source (vllm/model_executor/layers/quantization/
# compressed_tensors/ and kernels/linear/; CPU rows also run by scripts/check_vllm.sh). A WNA16 layer takes the first
# kernel in _POSSIBLE_KERNELS whose can_implement accepts it: on CUDA Machete (sm90; uint4/uint8 with zero points,
# uint4b8/uint8b128 without), Marlin (sm75+; uint4 with zero points, uint4b8/uint8b128 without), Exllama (float16,
# no zero points), Triton W4A16 (4-bit, either); on CPU CPUWNA16 (4-bit only, either).
def _weight_only_note(spec: QuantSpec) -> str:
    if spec.bits == 4:
        zp = "with zero points" if not spec.symmetric else "symmetric"
        return (
            f"vLLM: W4A16 {zp} (CompressedTensorsWNA16): Machete (sm90) / Marlin (sm75+) / Triton on NVIDIA GPUs, "
            "CPUWNA16LinearKernel on CPU (run by scripts/check_vllm.sh, bfloat16 or float16 activations)"
        )
    if spec.bits == 8 and spec.symmetric:
        return "vLLM: W8A16 symmetric (CompressedTensorsWNA16): Machete / Marlin / Exllama on NVIDIA GPUs; none on CPU"
    if spec.bits == 8:
        return (
            "vLLM: W8A16 with zero points (CompressedTensorsWNA16) only on Hopper (Machete, sm90) or with the optional "
            "conch / humming kernels; no Marlin path and no CPU kernel (vLLM CPU refuses it: uint8 not supported)"
        )
    return (
        f"vLLM has no kernel for {spec.bits}-bit weights (CompressedTensorsWNA16 accepts the scheme; Machete, Marlin "
        f"and CPUWNA16 take 4 and 8 bits only, so loading fails: uint{spec.bits} not supported); transformers loads "
        "it (dequantized at load) and 'qig eval' evaluates it"
    )


def _weight_activation_note(spec: QuantSpec, abits: int) -> str:
    if abits == 8 and spec.bits == 8 and spec.symmetric and spec.group_size is None:
        return (
            "vLLM: W8A8 int8 (CompressedTensorsW8A8Int8, dynamic per-token): CUTLASS / Triton on NVIDIA GPUs (sm75+), "
            "CPUInt8ScaledMMLinearKernel on CPU (run by scripts/check_vllm.sh)"
        )
    if abits == 8 and spec.bits == 4 and spec.symmetric:
        return (
            "vLLM: W4A8 int (CompressedTensorsW4A8Int): Dynamic4bitLinearKernel on CPU (Arm and x86; run by "
            "scripts/check_vllm.sh); on NVIDIA GPUs only with the optional humming kernels"
        )
    return f"vLLM has no integer W{spec.bits}A{abits} scheme; transformers loads it (activations fake-quantized)"
