"""The public entry point: ``qig.quantize(model, config, calib)``.

    >>> import qig
    >>> from qig.calib import embedded_calibration
    >>> from qig.evaluate import load_model_and_processor
    >>> model, processor = load_model_and_processor()  # doctest: +SKIP
    >>> calib = embedded_calibration(processor, n_samples=32)  # doctest: +SKIP
    >>> result = qig.quantize(model, qig.QIGConfig(wbits=3, group_size=128), calib)  # doctest: +SKIP
    >>> result.save("out/search")  # doctest: +SKIP

GPTQ is a quantizer as well as a method: ``qig.GPTQConfig(wbits=3)`` (plain),
``qig.GPTQConfig.weighted_by("qig", wbits=3)`` (QIG-weighted Hessian), and
``qig.QIGConfig(wbits=3, quantizer="gptq")`` (QIG's scale search, then GPTQ).

Weight-activation modes (``abits`` below 16: W4A8, W8A8, W4A4) with RTN,
SmoothQuant, AWQ, MBQ or QIG: ``qig.QIGConfig(wbits=4, abits=8, group_size=None)``;
weights per output channel, symmetric; activations per token, symmetric,
quantized at run time by quantizers installed on the decoder linears.

The model is quantized in place (fake-quantized weights, same architecture),
so ``model.save_pretrained`` writes a folder any transformers code can load.
Its ``config.json`` records the quantization under ``qig_quantization``
(also ``model.config.qig_quantization`` in memory), the entry that
``qig.evaluate.load_model_and_processor`` reads to re-install the activation
quantizers of a W-A model, and that exporters read::

    "qig_quantization": {
        "format": "fake-quant",          # weights stored dequantized, in the model's dtype
        "method": "qig",                 # the config's name
        "wbits": 4,                      # weight bits
        "group_size": null,              # input channels per weight scale; null: per output channel
        "weight_symmetric": true,        # symmetric abs-max (W-A) or asymmetric min-max (weight-only)
        "abits": 8,                      # activation bits; 16: activations not quantized (weight-only)
        "activations": "per-token symmetric dynamic",   # or "none" when abits is 16
        "quantized_modules": "decoder linears"          # which linears carry both quantizers
    }

``search.json`` and ``report.json`` hold the whole config (``abits`` included)
under ``"config"``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qig.calib import CalibrationSet
from qig.errors import QigError
from qig.fileio import atomic_dir, atomic_write_bytes, atomic_write_text
from qig.methods import QuantConfig, make_config
from qig.pipeline import GroupRecord, run_layerwise

log = logging.getLogger(__name__)

CONFIG_KEY = "qig_quantization"  # the model config entry described above
SEARCH_TENSORS = "search.safetensors"
SEARCH_JSON = "search.json"
REPORT_JSON = "report.json"


@dataclass
class QuantizationResult:
    """What a run found: per group the scale, losses and token weights; timings per phase."""

    config: QuantConfig
    groups: list[GroupRecord]
    timings: dict[str, float]
    method_summary: dict = field(default_factory=dict)
    roles: torch.Tensor | None = None  # [N, T] int8, the calibration tokens' roles
    applied_from: str | None = None
    # GPTQ runs: per "layer.linear" the quantizer's scale and zero [out, n_groups], and g_idx [in] under
    # act-order; the fake-quantized weights are exactly dequantize(quantize_with(W, scale, zero)).
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def scales(self) -> dict[tuple[int, str], torch.Tensor]:
        """``{(layer, group): s}``, the form ``quantize(..., scales=...)`` takes (searched groups only)."""
        return {(g.layer, g.group): g.scales for g in self.groups if g.scales is not None}

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
            "groups": [
                {
                    "layer": g.layer,
                    "group": g.group,
                    "ratio": g.ratio,
                    "loss_before": g.loss_before,
                    "loss_after": g.loss_after,
                    "token_weights": g.weight_stats,
                    "notes": g.notes,
                    "seconds": g.seconds,
                }
                for g in self.groups
            ],
        }

    def save(self, folder: str | os.PathLike) -> None:
        """``search.safetensors`` (scales, token weights, roles, GPTQ's quantizer parameters) and ``search.json``."""
        from safetensors.torch import save

        folder = Path(folder)
        tensors = {}
        for g in self.groups:
            if g.scales is not None:
                tensors[f"scales.{g.layer}.{g.group}"] = g.scales.contiguous()
            if g.token_weights is not None:
                tensors[f"token_weights.{g.layer}.{g.group}"] = g.token_weights.contiguous()
        if self.roles is not None:
            tensors["roles"] = self.roles.contiguous()
        for linear, params in self.quantized.items():
            for key, value in params.items():
                tensors[f"gptq.{linear}.{key}"] = value.contiguous()  # e.g. gptq.0.self_attn.q_proj.scale
        atomic_write_bytes(folder / SEARCH_TENSORS, save(tensors, metadata={"format": "qig-search-1"}))
        atomic_write_text(folder / SEARCH_JSON, json.dumps(self.to_json(), indent=1) + "\n")


def quantize(
    model: torch.nn.Module,
    config: QuantConfig,
    calib: CalibrationSet | None = None,
    *,
    device: str | torch.device = "cpu",
    scales: dict[tuple[int, str], torch.Tensor] | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize ``model``'s decoder layers in place with ``config``'s method.

    calib: the calibration set (``qig.calib``); RTN and ``scales=`` need none.
    device: where each decoder layer is computed ("cpu", "cuda", "cuda:1").
    scales: apply saved scales (``load_scales``) instead of searching.

    >>> result = quantize(model, AWQConfig(wbits=4, group_size=128), calib)  # doctest: +SKIP
    """
    if not isinstance(config, QuantConfig):
        raise QigError(f"config must be a method config such as QIGConfig(...), got {type(config).__name__}")
    check_device(device)
    torch.manual_seed(config.seed)
    model.eval()
    out = run_layerwise(model, config, calib, device=device, scales=scales, progress=progress)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, quantization_entry(config))
    return QuantizationResult(
        config=config,
        groups=out.groups,
        timings=out.timings,
        method_summary=out.method_summary,
        roles=out.roles,
        quantized=out.quantized,
    )


def quantization_entry(config: QuantConfig) -> dict:
    """The ``qig_quantization`` entry of a quantized model's config (keys in the module docstring).

    >>> quantization_entry(qig.RTNConfig(wbits=8, abits=8, group_size=None))["activations"]  # doctest: +SKIP
    'per-token symmetric dynamic'
    """
    spec = config.spec
    return {
        "format": "fake-quant",
        "method": config.name,
        "wbits": spec.bits,
        "group_size": spec.group_size,
        "weight_symmetric": spec.symmetric,
        "abits": config.abits,
        "activations": "per-token symmetric dynamic" if config.act_spec is not None else "none",
        "quantized_modules": "decoder linears",
    }


def check_device(device) -> None:
    """Refuse a device torch cannot parse or this machine does not have, saying what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QigError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise QigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def load_scales(path: str | os.PathLike) -> tuple[dict[tuple[int, str], torch.Tensor], dict | None]:
    """Scales from a ``search.safetensors`` (or its folder), and the run's config from ``search.json`` if present."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / SEARCH_TENSORS
    if not path.is_file():
        raise QigError(f"scales file {path} does not exist; pass the search.safetensors of an earlier run")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise QigError(f"{path} is not a readable safetensors file: {exc}") from exc
    scales = {}
    for key, value in tensors.items():
        if not key.startswith("scales."):
            continue
        _, layer, group = key.split(".", 2)
        scales[(int(layer), group)] = value
    if not scales:
        raise QigError(f"{path} holds no 'scales.<layer>.<group>' tensors; it is not a qig search result")
    config = None
    sidecar = path.with_name(SEARCH_JSON)
    if sidecar.is_file():
        try:
            config = json.loads(sidecar.read_text()).get("config")
        except json.JSONDecodeError as exc:
            raise QigError(f"{sidecar} is not valid JSON: {exc}") from exc
    return scales, config


def config_from_dict(fields: dict) -> QuantConfig:
    """Rebuild a config from ``QuantConfig.to_dict()`` output (as saved in search.json)."""
    fields = dict(fields)
    name = fields.pop("method", None)
    if name is None:
        raise QigError("the saved config has no 'method'")
    return make_config(name, **fields)


def versions() -> dict[str, str]:
    import transformers

    from qig import __version__

    return {
        "qig": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_output(
    out: str | os.PathLike,
    model: torch.nn.Module,
    processor,
    result: QuantizationResult,
    report: dict,
    overwrite: bool = False,
) -> Path:
    """Write the fake-quantized model, the search result and the run report into ``out``, atomically.

    Everything goes to a temporary sibling folder first and is renamed into
    place; an existing ``out`` is refused unless ``overwrite``.
    """
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        t = time.perf_counter()
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        result.save(tmp)
        report = dict(report)
        report.setdefault("timings", {})["save"] = time.perf_counter() - t
        atomic_write_text(tmp / REPORT_JSON, json.dumps(report, indent=1, default=str) + "\n")
    return out


def summary_table(result: QuantizationResult) -> str:
    """One line per searched group: grid ratio, weighted loss before and after, token-weight mass by role."""
    lines = [f"{'layer':>5} {'group':<9} {'r':>5} {'loss before':>12} {'loss after':>12} {'gain':>7}  weight mass"]
    for g in result.groups:
        mass = " ".join(f"{k[5:]}={v:.2f}" for k, v in g.weight_stats.items() if k.startswith("mass_"))
        if g.scales is None:
            lines.append(f"{g.layer:>5} {g.group:<9} {'':>5} {'(token weights for GPTQ)':>33}  {mass}")
            continue
        if g.loss_before is None:
            lines.append(f"{g.layer:>5} {g.group:<9} {'':>5} {'(applied)':>12}")
            continue
        gain = 100 * (1 - g.loss_after / g.loss_before) if g.loss_before else 0.0
        losses = f"{g.loss_before:>12.4g} {g.loss_after:>12.4g}"
        lines.append(f"{g.layer:>5} {g.group:<9} {g.ratio:>5.2f} {losses} {gain:>6.1f}%  {mass}")
    gptq = result.method_summary.get("gptq")
    if gptq:
        per_layer = gptq["seconds_per_layer"]
        lines.append(f"gptq: {len(per_layer)} layers, {sum(per_layer) / max(len(per_layer), 1):.2f}s per layer")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return "\n".join(lines)
