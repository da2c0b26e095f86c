"""Token-sensitivity maps: which tokens AWQ, MBQ and QIG weigh, per layer and group, as pictures and numbers.

    >>> from qig.tokenmaps import compute_token_maps, write_report
    >>> maps = compute_token_maps(model, processor, calib, layers="0,3,-1", wbits=3)  # doctest: +SKIP
    >>> write_report(maps, "out/inspect")  # doctest: +SKIP

Layers: maps (numbers) -> render (matplotlib, optional) -> report (folder, HTML).
``qig inspect`` and ``qig quantize --report`` are the command-line entry points.
"""

from qig.tokenmaps.compute import compute_token_maps, embedded_questions, resolve_layers
from qig.tokenmaps.grid import ImageTokens, PatchGrid, image_tokens, register_grid
from qig.tokenmaps.maps import TokenMaps, from_calibration
from qig.tokenmaps.report import write_report, write_run_report

__all__ = [
    "ImageTokens",
    "PatchGrid",
    "TokenMaps",
    "compute_token_maps",
    "embedded_questions",
    "from_calibration",
    "image_tokens",
    "register_grid",
    "resolve_layers",
    "write_report",
    "write_run_report",
]
