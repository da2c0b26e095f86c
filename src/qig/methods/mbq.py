"""MBQ: answer tokens weigh 1, vision tokens rho_l, everything else 0 (METHOD.md section 4).

rho_l comes from one gradient pre-pass: the SFT loss on answer tokens is
back-propagated through the FP model, batch by batch, and hooks on each
sub-layer's output linear (o_proj for attention, down_proj for the MLP)
accumulate the mean |dL/dy| over vision tokens and over answer tokens.
Nothing but these running sums is kept between batches.

    rho_l = max(gbar_vis,l / gbar_ans,l, median over layers of that ratio)

(the contract's formula, applied separately to attention and MLP sub-layers;
the ratio is floored at its median so no layer silences its vision tokens).

    >>> from qig.methods import method_for, MBQConfig
    >>> method_for(MBQConfig(wbits=3)).finds_scales
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from qig.calib import ANSWER, VISION
from qig.errors import QigError
from qig.methods.base import GroupContext, Method, TokenWeights, register
from qig.methods.config import SearchConfig
from qig.models import get_module
from qig.options import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MBQConfig(SearchConfig):
    """MBQ: answer tokens weigh 1, vision tokens rho_l (gradient ratio), the rest 0.

    grad_batch_size: samples per backward pass of the gradient pre-pass.

    >>> MBQConfig(wbits=3).grad_batch_size
    4
    """

    name: ClassVar[str] = "mbq"
    grad_batch_size: int = option(4, "MBQ: samples per backward of the gradient pre-pass", min=1)


@register(MBQConfig)
class MBQ(Method):
    def __init__(self, config: MBQConfig) -> None:
        super().__init__(config)
        self.rho: dict[str, list[float]] = {}  # sub-layer output path -> rho per layer
        self.ratios: dict[str, list[float]] = {}

    def prepare(self, model, family, calib, device) -> None:
        sums = gradient_magnitudes(model, family, calib, device, self.config.grad_batch_size, self.progress)
        for path, per_layer in sums.items():
            ratios = []
            for layer_index, s in enumerate(per_layer):
                if s["n_ans"] == 0:
                    raise QigError("MBQ needs answer tokens in the calibration set (assistant replies); found none")
                g_vis = s["vis"] / s["n_vis"] if s["n_vis"] else 0.0
                g_ans = s["ans"] / s["n_ans"]
                if g_ans == 0.0:
                    raise QigError(f"MBQ: zero answer-token gradient at layer {layer_index} {path}")
                ratios.append(g_vis / g_ans)
            median = float(torch.tensor(ratios).median())
            self.ratios[path] = ratios
            self.rho[path] = [max(r, median) for r in ratios]
            log.info("MBQ rho at %s: %s", path, ", ".join(f"{r:.3g}" for r in self.rho[path]))

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        rho = self.rho[ctx.group.sublayer_output][ctx.layer_index]
        out = []
        for roles in ctx.roles:
            w = torch.zeros(roles.shape, dtype=torch.float32, device=roles.device)
            w[roles == ANSWER] = 1.0
            w[roles == VISION] = rho
            out.append(w)
        return TokenWeights(out, {"rho": rho})

    def summary(self) -> dict:
        return {"rho": self.rho, "gradient_ratio": self.ratios}


def gradient_magnitudes(model, family, calib, device, batch_size: int, progress: bool = True) -> dict[str, list[dict]]:
    """Per sub-layer output path and layer: sums of mean_h |dL/dy| over vision / answer tokens and counts."""
    layers = family.decoder_layers(model)
    paths = sorted({g.sublayer_output for g in family.groups if g.sublayer_output})
    if not paths:
        raise QigError(f"family {family.name} names no sub-layer outputs; MBQ cannot measure gradients")
    sums = {p: [dict(vis=0.0, n_vis=0, ans=0.0, n_ans=0) for _ in layers] for p in paths}
    state: dict[str, torch.Tensor] = {}

    def grad_hook(path: str, layer_index: int):
        def on_grad(g: torch.Tensor) -> None:
            per_token = g.detach().float().abs().mean(-1)  # [b, T]
            s = sums[path][layer_index]
            vis, ans = state["roles"] == VISION, state["roles"] == ANSWER
            s["vis"] += float(per_token[vis].double().sum())
            s["n_vis"] += int(vis.sum())
            s["ans"] += float(per_token[ans].double().sum())
            s["n_ans"] += int(ans.sum())

        return on_grad

    def forward_hook(path: str, layer_index: int):
        def hook(_module, _args, out):
            if out.requires_grad:
                out.register_hook(grad_hook(path, layer_index))

        return hook

    def needs_grad(_module, args, kwargs):
        # The parameters are frozen; gradients start at the decoder's input.
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    handles = [layers[0].register_forward_pre_hook(needs_grad, with_kwargs=True)]
    for i, layer in enumerate(layers):
        for p in paths:
            handles.append(get_module(layer, p).register_forward_hook(forward_hook(p, i)))
    home = next(model.parameters()).device
    model.to(device)
    try:
        with torch.enable_grad():
            for batch in tqdm(list(calib.batches(batch_size)), desc="MBQ gradients", leave=False, disable=not progress):
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                roles = batch.roles.to(device)
                state["roles"] = roles
                logits = model(**inputs, use_cache=False).logits  # [b, T, V]
                target = roles[:, 1:] == ANSWER  # logits at p predict token p + 1
                if not target.any():
                    continue
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1][target].float(), inputs["input_ids"][:, 1:][target]
                )
                loss.backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return sums
