"""Token weights of AWQ, MBQ and QIG side by side, without quantizing the model.

The methods' own token-weight code runs on the pipeline's streams
(:func:`qig.pipeline.collect_token_weights`): nothing is searched, folded or
written into the model. The quantized stream x^q that QIG uses as its
reference goes through the RTN-quantized layers below (no scales), which is
exactly what a QIG run sees at its first group and a close stand-in deeper.

    >>> from qig.tokenmaps import compute_token_maps
    >>> maps = compute_token_maps(model, processor, calib, layers=[0, 3, -1], wbits=3)  # doctest: +SKIP
    >>> sorted(maps.methods)  # doctest: +SKIP
    ['awq', 'mbq', 'qig']
"""

from __future__ import annotations

import time

import torch

from qig.calib import DEFAULT_MAX_LENGTH, CalibrationSet, render_for
from qig.errors import QigError
from qig.methods import AWQConfig, MBQConfig, QIGConfig
from qig.models import family_for, linears
from qig.pipeline import collect_token_weights
from qig.tokenmaps.maps import TokenMaps, from_calibration


def resolve_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """Layer indices from "0,5,-1" / [0, -1] / "all" / None (first, middle, last); negatives count from the end.

    >>> resolve_layers("0,3,-1", 6)
    [0, 3, 5]
    >>> resolve_layers(None, 6)
    [0, 3, 5]
    """
    if spec is None:
        return sorted({0, n_layers // 2, n_layers - 1})
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(n_layers))
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise QigError(f"--layers {spec!r} must be comma-separated integers such as 0,5,-1, or 'all'") from None
    if not spec:
        raise QigError("no layers given; use e.g. --layers 0,5,-1 or --layers all")
    out = []
    for i in spec:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise QigError(f"layer {i} does not exist; the model has {n_layers} decoder layers (0..{n_layers - 1})")
        out.append(j)
    return sorted(set(out))


def compute_token_maps(
    model: torch.nn.Module,
    processor,
    calib: CalibrationSet,
    layers: str | list[int] | None = None,
    wbits: int = 3,
    group_size: int | None = 128,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    meta: list[dict] | None = None,
    qig_options: dict | None = None,
    progress: bool = True,
) -> TokenMaps:
    """AWQ, MBQ and QIG token weights for every group of the layers up to the deepest one in ``layers``.

    layers: the layers to picture (see :func:`resolve_layers`); the statistics
    cover every layer up to the deepest, since the streams pass through them anyway.
    qig_options: extra QIGConfig fields (baseline, clip, steps, quadrature).
    """
    n_layers = len(family_for(model).decoder_layers(model))
    shown = resolve_layers(layers, n_layers)
    depth = list(range(max(shown) + 1))
    common = dict(wbits=wbits, group_size=group_size, batch_size=batch_size)
    configs = [AWQConfig(**common), MBQConfig(**common), QIGConfig(**common, **(qig_options or {}))]
    for name, lin in _first_layer_linears(model):
        configs[0].spec.check(lin.in_features, name)
    model.eval()
    t = time.perf_counter()
    groups, summary = collect_token_weights(model, configs, calib, depth, device=device, progress=progress)
    seconds = time.perf_counter() - t
    weights = {(m, g.layer, g.group): w for g in groups for m, w in g.weights.items()}
    info = {
        "configs": {c.name: c.to_dict() for c in configs},
        "method_summary": summary,
        "notes": {f"{g.layer}.{g.group}": g.notes for g in groups},
        "quantized_stream": "x^q through the RTN-quantized layers below (nothing searched or folded)",
        "seconds_token_weights": seconds,
        "n_samples": len(calib),
    }
    return from_calibration(calib, processor, model.config, weights, shown, meta=meta, info=info)


def _first_layer_linears(model):
    layer = family_for(model).decoder_layers(model)[0]
    return [(f"layer 0 {n}", m) for n, m in linears(layer).items()]


def embedded_questions(
    model: torch.nn.Module,
    processor,
    n_samples: int = 8,
    seed: int = 0,
    kind: str = "qa",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[CalibrationSet, list[dict]]:
    """Samples of the embedded world rendered for ``model``, and their metadata (id, type, question, answer).

    kind "qa": questions whose answers mostly depend on one object (what colour
    is the circle?); "captions": the calibration split's image captions. The
    image tokens are the model family's (``qig.calib.render_for``).

    >>> calib, meta = embedded_questions(model, processor, n_samples=4)  # doctest: +SKIP
    """
    from qig.embedded import world

    if kind not in ("qa", "captions"):
        raise QigError(f"embedded data {kind!r} is not known; use qa or captions")
    pairs = world.generate("eval" if kind == "qa" else "calib", n_samples, seed)
    calib = render_for(model, processor, pairs, max_length=max_length)
    meta = [
        {
            "id": rec["id"],
            "type": rec.get("type"),
            "question": rec["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": rec["conversations"][-1]["value"],
        }
        for _, rec in pairs
    ]
    return calib, meta
