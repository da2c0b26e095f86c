"""The quantized state kept after quantization, and its names in ``search.safetensors``.

Every quantizer qig runs (RTN after any scale search, GPTQ, W-A per-channel
RTN) hands back, per linear, the parameters its integers were computed with:
``scale`` and ``zero`` [out, n_groups] float32, ``g_idx`` [in] int32
under GPTQ's act-order, and for NVFP4 the weight's per-tensor
``global_scale`` [1] (the scale is then the effective ``fp8 / global``) and,
with NVFP4 activations, the calibrated ``input_global_scale`` [1]. A run keeps them per ``"<layer>.<linear>"``
(``"0.self_attn.q_proj"``); the saved weights are exactly
``dequantize(quantize_with(w, scale, zero))``, so the export packs from them
instead of reading the grid back from the weights.

    >>> import torch
    >>> state = {"0.mlp.down_proj": {"scale": torch.ones(4, 2), "zero": torch.zeros(4, 2)}}
    >>> sorted(to_tensors(state))
    ['quantized.0.mlp.down_proj.scale', 'quantized.0.mlp.down_proj.zero']
    >>> from_tensors(to_tensors(state)).keys() == state.keys()
    True
"""

from __future__ import annotations

import torch

PREFIX = "quantized."
# qig before the RTN parameters were kept stored GPTQ's alone, under this prefix; still read.
OLD_PREFIXES = ("gptq.",)
FIELDS = ("scale", "zero", "g_idx", "global_scale", "input_global_scale")


def to_tensors(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat safetensors entries ``quantized.<layer>.<linear>.<scale|zero|g_idx>``."""
    return {f"{PREFIX}{name}.{key}": t.contiguous() for name, params in state.items() for key, t in params.items()}


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The state back from safetensors entries (other entries ignored); the current prefix wins over old ones."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for prefix in (*OLD_PREFIXES, PREFIX):  # the current prefix last, so it overrides
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            linear, _, field = key[len(prefix) :].rpartition(".")
            if field in FIELDS and linear:
                state.setdefault(linear, {})[field] = value
    return state
