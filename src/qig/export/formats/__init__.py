"""Export formats: one module each, registered by name (``--format``); see ``base`` for what a format is.

>>> from qig.export.formats import format_names
>>> format_names()
('compressed-tensors', 'fake-quant')
"""

# Each module registers its format on import; the order here is the order of the choices.
from qig.export.formats import compressed_tensors, fake_quant  # noqa: F401
from qig.export.formats.base import ExportFormat, Written, format_for, format_names, register

__all__ = ["ExportFormat", "Written", "format_for", "format_names", "register"]
