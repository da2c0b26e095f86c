"""Write a token-map report folder: pictures, ``index.html``, ``maps.json`` and ``weights.safetensors``.

The folder is written to a temporary sibling and renamed into place, so it
is either complete or absent; an existing folder is refused unless
``overwrite``. ``index.html`` references the pictures relatively and loads
nothing from the network: the folder can be copied and opened offline.

    >>> from qig.tokenmaps import write_report
    >>> write_report(maps, "out/inspect")  # doctest: +SKIP
    PosixPath('out/inspect')
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from qig.errors import QigError
from qig.fileio import atomic_dir, atomic_write_bytes, atomic_write_text
from qig.tokenmaps import render
from qig.tokenmaps.maps import TokenMaps

log = logging.getLogger(__name__)

MAPS_JSON = "maps.json"
WEIGHTS = "weights.safetensors"
INDEX = "index.html"
OVERVIEW = "overview.png"
SHARES = "shares.png"
VARIABILITY = "variability.png"


def write_report(
    maps: TokenMaps,
    out: str | os.PathLike,
    overwrite: bool = False,
    n_pictures: int = 8,
    title: str = "qig inspect: token-sensitivity maps",
) -> Path:
    """Write the report of ``maps`` into ``out`` atomically; pictures for the first ``n_pictures`` samples."""
    from safetensors.torch import save

    render.require_matplotlib()
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        t = time.perf_counter()
        files = {"overview": None, "shares": SHARES, "variability": VARIABILITY, "samples": []}
        method = "qig" if "qig" in maps.methods else maps.methods[0]
        overview_samples: list[int] = []
        if any(maps.images):
            overview_samples = render.overview_figure(maps, tmp / OVERVIEW, method=method)
            files["overview"] = OVERVIEW
        render.shares_figure(maps, tmp / SHARES)
        render.variability_figure(maps, tmp / VARIABILITY, method=method)
        (tmp / "samples").mkdir()
        for i in range(min(n_pictures, maps.n_samples)):
            name = f"samples/sample-{i:03d}.png"
            render.sample_figure(maps, i, tmp / name, method=method)
            files["samples"].append(name)
        seconds = time.perf_counter() - t
        data = maps.to_json()
        data["files"] = files
        data["overview_samples"] = overview_samples
        data["info"] = {**data["info"], "seconds_pictures": seconds}
        atomic_write_text(tmp / MAPS_JSON, json.dumps(data, indent=1) + "\n")
        atomic_write_bytes(tmp / WEIGHTS, save(maps.tensors(), metadata={"format": "qig-token-maps-1"}))
        atomic_write_text(tmp / INDEX, index_html(maps, data, method, title))
        _readable(tmp)
    log.info("wrote the token-map report to %s (pictures %.1fs)", out, seconds)
    return out


def _readable(folder: Path) -> None:
    """Temporary files are private (0600); a report is meant to be shared or served: 0755 / 0644."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
td:first-child, th:first-child, td.l { text-align: left; }
.tok { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; font-size: 0.85em; }
.line { margin: 3px 0; }
.lab { display: inline-block; width: 11em; color: #555; font-size: 0.85em; }
details { margin: 0.4em 0 1em 0; }
"""


def _chip_html(text: str, rel: float) -> str:
    r, g, b = (int(round(255 * c)) for c in render._colours(np.array([rel]))[0])
    fg = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 128 else "#000"
    return (
        f'<span class="tok" style="background:rgb({r},{g},{b});color:{fg}" '
        f'title="{rel:.3g} x uniform">{html.escape(text)}</span>'
    )


def _esc(x) -> str:
    return html.escape(str(x))


def index_html(maps: TokenMaps, data: dict, method: str, title: str) -> str:
    """The report page: pictures, an entropy table and every sample's tokens coloured per method/layer/group."""
    files = data["files"]
    info = data["info"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<p>Colours: a token's weight divided by the mean weight of its sample's real tokens (AWQ's uniform "
        "weight = x1): blue below, red above, saturating at x1/4 and x4. Entropy H: of the weights over the "
        "sample's vision tokens, relative to uniform (1 = uniform, lower = concentrated).</p>",
        f"<p>Methods: {_esc(', '.join(m.upper() for m in maps.methods))}. Layers with weights: "
        f"{_esc(maps.layers)}; pictured: {_esc(maps.shown)}. Samples: {maps.n_samples}. "
        f"Raw numbers: <a href='{MAPS_JSON}'>{MAPS_JSON}</a>, <a href='{WEIGHTS}'>{WEIGHTS}</a>.</p>",
    ]
    if info.get("quantized_stream"):
        parts.append(f"<p>Quantized stream: {_esc(info['quantized_stream'])}.</p>")
    if files["overview"]:
        parts.append(f"<h2>Overview</h2><img src='{files['overview']}' alt='overview'>")
    parts.append(f"<h2>Weight share by modality across depth</h2><img src='{files['shares']}' alt='shares'>")
    parts.append(
        f"<h2>Token variability inside each modality ({method.upper()})</h2>"
        f"<img src='{files['variability']}' alt='variability'>"
    )
    group = maps.groups[0]
    parts.append(f"<h2>Entropy of the vision map ({group}; 1 = uniform)</h2><table><tr><th>sample</th><th>type</th>")
    parts += [f"<th>{_esc(m.upper())} L{layer}</th>" for m in maps.methods for layer in maps.shown]
    parts.append("</tr>")
    for i, s in enumerate(data["samples"]):
        parts.append(
            f"<tr><td><a href='#s{i}'>{_esc(s.get('id', i))}</a></td><td class='l'>{_esc(s.get('type', ''))}</td>"
        )
        for m in maps.methods:
            for layer in maps.shown:
                v = s["entropy"].get(m, {}).get(f"{layer}.{group}", {}).get("vision")
                parts.append(f"<td>{'' if v is None else f'{v:.3f}'}</td>")
        parts.append("</tr>")
    parts.append("</table><h2>Samples</h2>")
    for i, s in enumerate(data["samples"]):
        parts.append(f"<h3 id='s{i}'>{_esc(s.get('id', i))} {_esc(s.get('type', ''))}</h3>")
        if i < len(files["samples"]):
            parts.append(f"<img src='{files['samples'][i]}' alt='sample {i}'>")
        parts.append("<details open><summary>tokens coloured by weight</summary>")
        for m in maps.methods:
            for layer in maps.shown:
                for g in maps.groups:
                    if maps.get(m, layer, g) is None:
                        continue
                    chips = "".join(_chip_html(t, v) for t, v in render.text_chips(maps, m, layer, g, i))
                    parts.append(
                        f"<div class='line'><span class='lab'>{_esc(m.upper())} L{layer} {_esc(g)}</span>{chips}</div>"
                    )
        parts.append("</details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_run_report(
    result,
    calib,
    processor,
    model_config,
    out: str | os.PathLike,
    layers: str | list[int] | None = None,
    n_pictures: int = 8,
    overwrite: bool = False,
) -> Path:
    """The report of the token weights a quantization run actually used (``qig quantize --report``).

    result: a :class:`qig.api.QuantizationResult` of a search; calib: its calibration set.
    Pictures for the first ``n_pictures`` samples and ``layers`` (default: first, middle, last).
    """
    from qig.tokenmaps.compute import resolve_layers
    from qig.tokenmaps.maps import from_calibration

    if calib is None:
        raise QigError("--report needs the run's calibration data; a run without a search (rtn, --scales) has none")
    method = result.config.name
    weights = {(method, g.layer, g.group): g.token_weights for g in result.groups if g.token_weights is not None}
    if not weights:
        raise QigError(
            f"the model is written to {Path(out).parent}, but there is no report: this {method} run weighted no "
            "tokens (--report needs awq, mbq, qig, or gptq with --token-weights)"
        )
    n_layers = max(layer for _, layer, _ in weights) + 1
    info = {
        "configs": {method: result.config.to_dict()},
        "method_summary": result.method_summary,
        "notes": {f"{g.layer}.{g.group}": {method: g.notes} for g in result.groups},
        "source": "the token weights the quantization run used (streams with the searched scales)",
        "n_samples": len(calib),
    }
    maps = from_calibration(calib, processor, model_config, weights, resolve_layers(layers, n_layers), info=info)
    return write_report(
        maps, out, overwrite=overwrite, n_pictures=n_pictures, title=f"qig quantize: {method} token maps"
    )
