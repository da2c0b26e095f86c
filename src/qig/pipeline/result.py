"""What a run found, one dataclass for the pipeline and ``qig.quantize``: :class:`QuantizationResult`.

>>> result = qig.quantize(model, qig.AWQConfig(wbits=3), calib)  # doctest: +SKIP
>>> result.scales()[(0, "attn_in")].shape  # doctest: +SKIP
torch.Size([128])
>>> result.save("out/run")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qig.fileio import atomic_write_bytes, atomic_write_text
from qig.methods import QuantConfig
from qig.quant import stored
from qig.runfiles import SEARCH_JSON, SEARCH_TENSORS


@dataclass
class GroupRecord:
    """What the search found for one group; token_weights: [N, T] (pad = 0)."""

    layer: int
    group: str
    scales: torch.Tensor | None  # None: token weights only (GPTQ with a weighted Hessian), no search
    ratio: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    token_weights: torch.Tensor | None = None
    weight_stats: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # linear path in the layer -> [out, n_groups]

    def to_json(self) -> dict:
        """The record less its tensors: one entry of ``search.json``'s groups and of a journal layer's."""
        return {
            "layer": self.layer,
            "group": self.group,
            "ratio": self.ratio,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "weight_stats": self.weight_stats,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(
        cls,
        entry: dict,
        scales: torch.Tensor | None,
        token_weights: torch.Tensor | None,
        clips: dict[str, torch.Tensor] | None = None,
    ) -> GroupRecord:
        """A record back from :meth:`to_json` and its tensors."""
        return cls(scales=scales, token_weights=token_weights, clips=clips or {}, **entry)


@dataclass
class InspectedGroup:
    """Token weights of one group under several methods, without any search: method name -> [N, T]."""

    layer: int
    group: str
    weights: dict[str, torch.Tensor]
    notes: dict[str, dict] = field(default_factory=dict)


@dataclass
class QuantizationResult:
    """What a run found: per group the scale, losses and token weights; timings per phase; the quantized state.

    quantized: per ``"layer.linear"`` the quantizer's parameters (``qig.quant.stored``):
    scale and zero [out, n_groups], and g_idx [in] under GPTQ's act-order; the
    fake-quantized weights are exactly ``dequantize(quantize_with(W, scale, zero))``.
    """

    config: QuantConfig
    groups: list[GroupRecord]
    timings: dict[str, float]
    method_summary: dict = field(default_factory=dict)
    roles: torch.Tensor | None = None  # [N, T] int8, the calibration tokens' roles
    applied_from: str | None = None
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    memory_plan: dict[str, int] = field(default_factory=dict)  # bytes by item (``qig.pipeline.plan``)

    def scales(self) -> dict[tuple[int, str], torch.Tensor]:
        """``{(layer, group): s}``, the form ``quantize(..., scales=...)`` takes (searched groups only)."""
        return {(g.layer, g.group): g.scales for g in self.groups if g.scales is not None}

    def clips(self) -> dict[tuple[int, str], torch.Tensor]:
        """``{(layer, linear path): ratios [out, n_groups]}``: the clip search's choices (``weight_clip``)."""
        return {(g.layer, p): r for g in self.groups for p, r in g.clips.items()}

    def token_weights(self, layer: int, group: str) -> torch.Tensor | None:
        """The token weights [N, T] one group's search used (None if not searched)."""
        for g in self.groups:
            if (g.layer, g.group) == (layer, group):
                return g.token_weights
        raise KeyError(f"no group {group!r} in layer {layer}")

    def to_json(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "applied_from": self.applied_from,
            "method_summary": self.method_summary,
            "groups": [g.to_json() for g in self.groups],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``search.safetensors`` holds: scales, token weights, roles, the quantizer parameters, by key."""
        tensors = {}
        for g in self.groups:
            if g.scales is not None:
                tensors[f"scales.{g.layer}.{g.group}"] = g.scales.contiguous()
            if g.token_weights is not None:
                tensors[f"token_weights.{g.layer}.{g.group}"] = g.token_weights.contiguous()
            for path, ratios in g.clips.items():
                tensors[f"clip.{g.layer}.{path}"] = ratios.contiguous()
        if self.roles is not None:
            tensors["roles"] = self.roles.contiguous()
        tensors.update(stored.to_tensors(self.quantized))  # e.g. quantized.0.self_attn.q_proj.scale
        return tensors

    def save(self, folder: str | os.PathLike) -> None:
        """``search.safetensors`` (scales, token weights, roles, the quantizer parameters) and ``search.json``."""
        from safetensors.torch import save

        folder = Path(folder)
        atomic_write_bytes(folder / SEARCH_TENSORS, save(self.tensors(), metadata={"format": "qig-search-1"}))
        atomic_write_text(folder / SEARCH_JSON, json.dumps(self.to_json(), indent=1) + "\n")
