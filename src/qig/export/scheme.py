"""Which compressed-tensors scheme holds a qig setting, and what can serve it.

The mapping is data (STYLE.md rule 6): a qig weight spec plus the activation
spec (None: weight-only) give the compressed-tensors ``QuantizationScheme``
fields and its storage format; a setting the format cannot hold is refused
before anything is written.

    >>> from qig.quant.spec import QuantSpec, activation_spec
    >>> s = scheme_for(QuantSpec(bits=4, group_size=128))
    >>> s.format, s.weights["strategy"], s.weights["symmetric"]
    ('pack-quantized', 'group', False)
    >>> scheme_for(QuantSpec(bits=8, group_size=None, symmetric=True), activation_spec(8)).format
    'int-quantized'
    >>> scheme_for(QuantSpec(8, None, True, number="fp8"), activation_spec(8, "fp8")).format
    'float-quantized'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec

ACTIVATION_BITS = (4, 8, 16)  # 16: weight-only

# Storage format per weight number: integers pack into int32 words (int8 storage with integer activations),
# FP8 is stored as float8_e4m3fn, FP4 packs two codes to a byte with FP8 (NVFP4) or E8M0 (MXFP4) group scales.
FLOAT_FORMATS = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
# The group-scale dtype compressed-tensors stores per float number (None: the scale's own float dtype).
SCALE_DTYPES = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.uint8}


@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors scheme: weight and input-activation arguments, storage format, serving note."""

    format: str  # "pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized", ...
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


def _args(spec: QuantSpec) -> dict:
    """The compressed-tensors ``QuantizationArgs`` fields of a weight or activation spec."""
    strategy = "token" if spec.dynamic else "channel"
    if spec.group_size is not None:
        strategy = "tensor_group" if spec.number == "nvfp4" else "group"
    args = {
        "num_bits": spec.bits,
        "type": "float" if spec.is_float else "int",
        "symmetric": spec.symmetric,
        "strategy": strategy,
        "group_size": spec.group_size,
        "dynamic": ("local" if spec.number == "nvfp4" else True) if spec.dynamic else False,
    }
    if spec.number in SCALE_DTYPES:
        args["scale_dtype"] = args["zp_dtype"] = SCALE_DTYPES[spec.number]
    return args


def scheme_for(spec: QuantSpec, act_spec: QuantSpec | None = None) -> Scheme:
    """The scheme of weights quantized by ``spec`` with activations quantized by ``act_spec`` (None: none)."""
    abits = 16 if act_spec is None else act_spec.bits
    if act_spec is not None and not act_spec.is_float and abits not in ACTIVATION_BITS:
        raise QigError(
            f"activation bits {abits} cannot be exported: compressed-tensors' integer schemes use per-token "
            f"dynamic activations of 4 or 8 bits (or none, 16); use --format fake-quant for other settings"
        )
    weights = _args(spec)
    if spec.is_float:
        fmt = FLOAT_FORMATS[spec.number]
    elif act_spec is not None and not act_spec.is_float:
        fmt = "int-quantized"
    else:
        fmt = "pack-quantized"  # weight-only, and int4 weights with FP8 activations (W4AFP8)
    acts = None if act_spec is None else _args(act_spec)
    note = _weight_only_note(spec) if act_spec is None else _weight_activation_note(spec, act_spec)
    return Scheme(fmt, weights, acts, note)


# What vLLM 0.32 does with each scheme, read from its source (vllm/model_executor/layers/quantization/
# compressed_tensors/ and kernels/linear/; CPU rows also run by scripts/check_vllm.sh). A WNA16 layer takes the first
# kernel in _POSSIBLE_KERNELS whose can_implement accepts it: on CUDA Machete (sm90; uint4/uint8 with zero points,
# uint4b8/uint8b128 without), Marlin (sm75+; uint4 with zero points, uint4b8/uint8b128 without), Exllama (float16,
# no zero points), Triton W4A16 (4-bit, either); on CPU CPUWNA16 (4-bit only, either).
def _weight_only_note(spec: QuantSpec) -> str:
    if spec.is_float:
        return FLOAT_NOTES[(spec.number, None)]
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


def _weight_activation_note(spec: QuantSpec, act_spec: QuantSpec) -> str:
    abits = act_spec.bits
    if act_spec.is_float or spec.is_float:
        return FLOAT_NOTES.get((spec.number, act_spec.number), f"vLLM has no W{spec.label()} / {act_spec.label()} path")
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


# Float numbers: the class vLLM 0.32's parser picks (compressed_tensors.py, _get_scheme_from_parts) and its
# get_min_capability(), as scripts/vllm_schemes.py prints them for each export (check_vllm.sh step 5).
FLOAT_NOTES = {
    ("fp8", "fp8"): "vLLM: FP8 W8A8 (CompressedTensorsW8A8Fp8, dynamic per-token): NVIDIA GPUs sm89+ (Ada, Hopper, "
    "Blackwell); below sm89 vLLM runs the weights as W8A16 (CompressedTensorsW8A16Fp8)",
    ("int", "fp8"): "vLLM: W4AFP8 (CompressedTensorsW4A8Fp8): Hopper (sm90) only; vLLM 0.32 finds no scheme for it "
    "on other GPUs",
    ("nvfp4", None): "vLLM: NVFP4 weight-only (CompressedTensorsW4A4Fp4, a16): FP4 kernels on Blackwell (sm100), "
    "Marlin on older GPUs (sm75+)",
    ("nvfp4", "nvfp4"): "vLLM: NVFP4 W4A4 (CompressedTensorsW4A4Fp4): FP4 tensor cores on Blackwell (sm100); older "
    "GPUs (sm75+) run it through Marlin with 16-bit activations",
    ("mxfp4", None): "vLLM: MXFP4 (CompressedTensorsW4A4Mxfp4, weight-only): NVIDIA GPUs sm80+",
    ("mxfp4", "mxfp4"): "vLLM: MXFP4 W4A4 (CompressedTensorsW4A4Mxfp4): NVIDIA GPUs sm80+",
}
