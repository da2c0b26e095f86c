"""The public entry point: ``qig.quantize(model, config, calib)``.

    >>> import qig
    >>> from qig.calib import calibration_for
    >>> from qig.loading import load_model_and_processor
    >>> model, processor = load_model_and_processor()  # doctest: +SKIP
    >>> calib = calibration_for(model, processor, n_samples=32)  # doctest: +SKIP
    >>> result = qig.quantize(model, qig.QIGConfig(wbits=3, group_size=128), calib)  # doctest: +SKIP
    >>> result.save("out/search")  # doctest: +SKIP

These are the calls ``qig quantize`` makes; ``qig.runs.write_output`` writes
the whole run folder (model, processor, search, report) as the CLI does.

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
``qig.loading.load_model_and_processor`` reads to re-install the activation
quantizers of a W-A model, and that exporters read::

    "qig_quantization": {
        "format": "fake-quant",          # weights stored dequantized, in the model's dtype
        "method": "qig",                 # the config's name
        "wbits": 4,                      # weight bits
        "group_size": null,              # input channels per weight scale; null: per output channel
        "weight_symmetric": true,        # symmetric abs-max (W-A) or asymmetric min-max (weight-only)
        "abits": 8,                      # activation bits; 16: activations not quantized (weight-only)
        "activations": "per-token symmetric dynamic",   # or "none" when abits is 16
        # with --scheme also: "scheme", "number" and "activation_number" ("int", "fp8", "nvfp4", "mxfp4"),
        # and for NVFP4 activations "input_global_scales": {"<layer>.<linear>": calibrated per-tensor scale}
        "quantized_modules": "decoder linears"          # which linears carry both quantizers
    }

``search.json`` and ``report.json`` hold the whole config (``abits`` included)
under ``"config"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qig import dist
from qig.calib import CalibrationSet
from qig.errors import QigError
from qig.methods import QuantConfig
from qig.pipeline import QuantizationResult, run_layerwise  # the result is defined once, in qig.pipeline.result
from qig.runs import CONFIG_KEY, load_scales  # the run folder's home; load_scales is public as qig.load_scales

__all__ = ["QuantizationResult", "check_device", "load_scales", "quantization_entry", "quantize", "summary_table"]

log = logging.getLogger(__name__)


def quantize(
    model: torch.nn.Module,
    config: QuantConfig,
    calib: CalibrationSet | None = None,
    *,
    device: str | torch.device = "cpu",
    scales: dict[tuple[int, str], torch.Tensor] | None = None,
    clips: dict[tuple[int, str], torch.Tensor] | None = None,
    progress: bool = True,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    offload_streams: str = "auto",
    fingerprint_extra: dict | None = None,
) -> QuantizationResult:
    """Quantize ``model``'s decoder layers in place with ``config``'s method.

    calib: the calibration set (``qig.calib``); RTN and ``scales=`` need none.
    device: where each decoder layer is computed ("cpu", "cuda", "cuda:1").
    scales: apply saved scales (``load_scales``) instead of searching; clips: with them, the
    saved clip ratios (``qig.runs.load_clips``, ``{(layer, linear path): [out, n_groups]}``).
    work_dir: a folder where every finished layer is kept as the run goes
    (``qig.pipeline.journal``); required for a model loaded with ``decoder="disk"``.
    resume: continue the run whose finished layers are in ``work_dir`` (refused if
    the model, the calibration data or the config differ from that run's).
    offload_streams: keep the calibration streams and the search's group inputs
    and reference outputs on the host ("cpu"), on the device ("none"), or decide
    from the memory plan ("auto": the streams first, then the group inputs).
    fingerprint_extra: more of what the results depend on, compared on resume.

    >>> result = quantize(model, AWQConfig(wbits=4, group_size=128), calib)  # doctest: +SKIP
    """
    if not isinstance(config, QuantConfig):
        raise QigError(f"config must be a method config such as QIGConfig(...), got {type(config).__name__}")
    check_device(device)
    model.eval()
    with dist.use(dist.from_process_group()) as ranks:
        journal = None
        if work_dir is not None:
            journal = _journal(model, calib, config, device, scales, work_dir, resume, fingerprint_extra, ranks, clips)
        elif resume:
            raise QigError("resume=True needs the work_dir of the run to continue")
        result = run_layerwise(
            model,
            config,
            calib,
            device=device,
            scales=scales,
            clips=clips,
            progress=progress and ranks.main,
            journal=journal,
            offload_streams=offload_streams,
        )
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, quantization_entry(config, result.quantized))
    return result


def _journal(model, calib, config, device, scales, work_dir, resume, extra, ranks, clips=None):
    """The run's journal: rank 0 opens (or resumes) it; the other ranks read the same folder."""
    from qig.pipeline.journal import Journal, fingerprint

    stamp = fingerprint(model, calib, config, {"device": torch.device(device).type, **(extra or {})})
    if scales is not None:
        stamp["scales"] = {f"{li}.{g}": float(s.double().sum()) for (li, g), s in sorted(scales.items())}
    if clips:
        stamp["clips"] = {f"{li}.{p}": float(r.double().sum()) for (li, p), r in sorted(clips.items())}
    journal = Journal.open(work_dir, stamp, resume=resume) if ranks.main else None
    dist.barrier()  # the folder exists (or rank 0's refusal is raised on every rank)
    return journal if journal is not None else Journal(Path(work_dir), stamp)


def quantization_entry(config: QuantConfig, quantized: dict | None = None) -> dict:
    """The ``qig_quantization`` entry of a quantized model's config (keys in the module docstring).

    quantized: the run's quantizer parameters (``QuantizationResult.quantized``); NVFP4 activations' calibrated
    per-tensor scales are recorded from them, by ``"<layer>.<linear>"``.

    >>> quantization_entry(qig.RTNConfig(wbits=8, abits=8, group_size=None))["activations"]  # doctest: +SKIP
    'per-token symmetric dynamic'
    """
    spec, act = config.spec, config.act_spec
    entry = {
        "format": "fake-quant",
        "method": config.name,
        "wbits": spec.bits,
        "group_size": spec.group_size,
        "weight_symmetric": spec.symmetric,
        "abits": config.abits,
        "activations": "per-token symmetric dynamic" if act is not None else "none",
        "quantized_modules": "decoder linears",
    }
    if config.scheme is not None:
        entry.update(scheme=config.scheme, number=spec.number, activation_number=None if act is None else act.number)
    scales = {k: float(p["input_global_scale"]) for k, p in (quantized or {}).items() if "input_global_scale" in p}
    if scales:
        entry["input_global_scales"] = scales
    return entry


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
