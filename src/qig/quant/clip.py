"""Weight clipping: each quantization group's range shrunk by a ratio, before the quantizer runs.

AWQ's ``auto_clip`` picks, per output row and weight group, a ratio of the
group's range; the weights are clamped to it and then quantized as usual, so
the quantizer (RTN or GPTQ, any ``QuantSpec``) sees only clamped weights and
what it stores and the export packs follow from them. Asymmetric specs clamp
to ``ratio * [min, max]`` of the group, symmetric ones to ``ratio * [-absmax,
absmax]``. A ratio of 1 leaves the group unchanged.

    >>> import torch
    >>> from qig.quant.spec import QuantSpec
    >>> w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    >>> clip_weight(w, torch.tensor([[0.5]]), QuantSpec(bits=4, group_size=None))
    tensor([[-0.5000,  0.5000,  1.0000,  0.0000]])
"""

from __future__ import annotations

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec

# AWQ's grid: 1.0, 0.95, ..., 0.55 (n_grid 20, max_shrink 0.5), largest first so that ties keep the weights.
CLIP_RATIOS: tuple[float, ...] = tuple(1.0 - i / 20 for i in range(10))


def n_groups(in_features: int, spec: QuantSpec) -> int:
    """Weight groups per output row: in_features / group_size, or 1 per channel."""
    spec.check(in_features)
    return in_features // (spec.group_size or in_features)


def clip_weight(w: torch.Tensor, ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` [out, in] clamped per output row and group to ``ratio`` [out, n_groups] of the group's range.

    Computed in float32, returned in ``w``'s dtype (a clamp only picks values among
    the group's own and their scaled bounds, so nothing else moves).
    """
    out_features, in_features = w.shape
    G = n_groups(in_features, spec)
    if tuple(ratio.shape) != (out_features, G):
        raise QigError(
            f"clip ratios of shape {list(ratio.shape)} do not fit a weight [{out_features}, {in_features}] "
            f"quantized {spec.label()} ({G} group(s) per row); they were searched for another model or group size, "
            "re-run the search"
        )
    wg = w.float().reshape(out_features, G, -1)  # [out, G, g]
    r = ratio.to(device=w.device, dtype=torch.float32).unsqueeze(-1)  # [out, G, 1]
    if spec.symmetric:
        hi = wg.abs().amax(-1, keepdim=True) * r
        lo = -hi
    else:
        lo, hi = wg.amin(-1, keepdim=True) * r, wg.amax(-1, keepdim=True) * r
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def clip_linear_(linear: torch.nn.Linear, ratio: torch.Tensor, spec: QuantSpec) -> None:
    """Clamp a linear's weight in place (:func:`clip_weight`)."""
    linear.weight.copy_(clip_weight(linear.weight.data, ratio, spec))
