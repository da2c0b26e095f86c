"""Model knowledge as data: where the decoder layers are and how their scale groups look.

>>> from qig.models import family_for
>>> family_for(model).name  # doctest: +SKIP
'llava'
"""

from qig.models.families import FAMILIES, family_for
from qig.models.family import ModelFamily, ScaleGroup, get_module, linears

__all__ = ["FAMILIES", "ModelFamily", "ScaleGroup", "family_for", "get_module", "linears"]
