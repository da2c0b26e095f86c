"""Export a ``qig quantize`` folder: compressed-tensors (vLLM, transformers) or a plain fake-quant checkpoint.

    >>> from qig.export import FORMATS
    >>> FORMATS
    ('compressed-tensors', 'fake-quant')

``export(input_dir, output_dir, fmt)`` does it; see docs/export.md for
serving and loading the result.
"""

from qig.export.writer import FORMATS, ExportResult, check_format, export, export_after

__all__ = ["FORMATS", "ExportResult", "check_format", "export", "export_after"]
