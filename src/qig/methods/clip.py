"""The token-weighted clipping search (AWQ's ``auto_clip``), run after a group's scale is folded.

For each linear of the group, with its folded weight ``W'`` [out, in] and the
inputs it now sees ``X' = X / s`` (the search's inputs: x, or x^q in W-A
modes), every ratio ``c`` of :data:`qig.quant.clip.CLIP_RATIOS` is scored per
output row ``o`` and weight group ``g`` by the token-weighted squared error of
that group's share of the output:

    E_og(c) = sum_t w_t (X'_tg . (Q(clip_c(W'))_og - W'_og))^2 / sum_t w_t

with the method's own token weights ``w_t`` (AWQ: 1 per real token, MBQ: its
role weights, QIG: lambda_t) and the production quantizer ``Q`` on the clamped
weights (:func:`qig.quant.clip.clip_weight`). Squared error as llm-awq's
auto_clip; unlike llm-awq, q and k are clipped too and every weighted token
counts (llm-awq skips q/k and subsamples 512 tokens). Activation quantization
(W-A modes) is left out of the clip's error. Ties keep the larger ratio.

    >>> ratios = search_clip(ctx, weights, scales)  # doctest: +SKIP
    >>> ratios["self_attn.q_proj"].shape  # [out, n_groups]  # doctest: +SKIP
    torch.Size([256, 2])
"""

from __future__ import annotations

import torch

from qig.methods.base import GroupContext
from qig.methods.search import ordered_on
from qig.quant.clip import CLIP_RATIOS, clip_weight, n_groups
from qig.quant.spec import fake_quantize

TOKEN_BLOCK = 2048  # tokens per matmul: [block, out] partial outputs per group at a time


@torch.no_grad()
def search_clip(ctx: GroupContext, weights: list[torch.Tensor], scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per linear key of the group, the chosen clip ratio per output row and group: [out, n_groups] float32 (CPU).

    weights: the method's token weights per chunk [b, T]; scales: the folded scale [C]
    (the linears' weights already hold ``W * s``).
    """
    out = {}
    for key, lin in ctx.linears.items():
        w = lin.weight.data  # [out, C], folded
        shape = (w.shape[0], n_groups(w.shape[1], ctx.spec))
        deltas = []  # per candidate [out, C]: Q(clip_c(W')) - W'
        for c in CLIP_RATIOS:
            deltas.append(fake_quantize(clip_weight(w, torch.full(shape, c), ctx.spec), ctx.spec).float() - w.float())
        s = scales.to(w.device, torch.float32)
        parts = []
        for i, x in enumerate(ctx.search_inputs):
            xs = x.to(w.device).float() / s  # [b, T, C]: what the folded linear sees
            parts.append((_group_errors(xs, weights[i].to(w.device), deltas, ctx.spec.group_size), 0))
        total = None
        for err, _ in ordered_on(parts, w.device):  # every rank's chunks, in chunk order
            total = err if total is None else total + err
        best = total.argmin(0)  # [out, G]: first minimum, the largest ratio among ties
        ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=best.device)
        out[key] = ratios[best].cpu()
    return out


def _group_errors(
    x: torch.Tensor, w_tok: torch.Tensor, deltas: list[torch.Tensor], group_size: int | None
) -> torch.Tensor:
    """sum_t w_t (x_tg . d_og)^2 per candidate, row and group: [n_candidates, out, G] float64.

    x: [b, T, C]; w_tok: [b, T]; deltas: per candidate [out, C].
    """
    keep = w_tok > 0
    xt, wt = x[keep], w_tok[keep].double()  # [n, C], [n]
    out_features, C = deltas[0].shape
    g = group_size or C
    G = C // g
    err = torch.zeros(len(deltas), out_features, G, dtype=torch.float64, device=x.device)
    for start in range(0, xt.shape[0], TOKEN_BLOCK):
        xb, wb = xt[start : start + TOKEN_BLOCK], wt[start : start + TOKEN_BLOCK]
        for j, d in enumerate(deltas):
            for k in range(G):
                p = xb[:, k * g : (k + 1) * g] @ d[:, k * g : (k + 1) * g].T  # [n, out]
                err[j, :, k] += (p.double().square() * wb[:, None]).sum(0)
    return err
