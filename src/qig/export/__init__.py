"""Export a ``qig quantize`` folder in a registered format: compressed-tensors (vLLM, transformers) or fake-quant.

    >>> from qig.export import format_names
    >>> format_names()
    ('compressed-tensors', 'fake-quant')

``export(input_dir, output_dir, fmt)`` does it; a format is one module in
``qig.export.formats`` (see docs/export.md, "Adding a format"); see
docs/export.md for serving and loading the result.
"""

from qig.export.formats import ExportFormat, format_for, format_names, register
from qig.export.writer import ExportResult, check_format, export, export_after

__all__ = [
    "ExportFormat",
    "ExportResult",
    "check_format",
    "export",
    "export_after",
    "format_for",
    "format_names",
    "register",
]
