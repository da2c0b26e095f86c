"""Import shim for vLLM on a CPU-only torch without torchvision (installed by scripts/check_vllm.sh).

transformers 5 ships two image processors per model: a torchvision-backed one
(``transformers.models.M.image_processing_M``, which imports
``torchvision.transforms.v2`` at the top) and its PIL twin
(``image_processing_pil_M``: the same helper functions, the processor class
named ``...ImageProcessorPil``). vLLM's model files import helpers from the
torchvision one directly, e.g. ``llava.py`` via transformers' Pixtral
processor (``get_resize_output_image_size``), ``pixtral.py``
(``_num_image_tokens``), ``qwen2_vl.py`` (``smart_resize``), ``gemma3_mm.py``
(``Gemma3ImageProcessor``). The registry's torchvision wheels are CUDA builds
(their ``_C.so`` links ``libtorch_cuda.so``) and do not load with the CPU
torch vLLM needs, so the check's venv has no torchvision, and those imports
fail.

This finder answers such an import, only while torchvision is absent and only
for a module that has a PIL twin, with a module holding the twin's names, plus
each ``...Pil`` class under its name without the suffix. A ``.pth`` file
imports this module at interpreter start, so vLLM's engine processes get it
too. With torchvision installed the finder does nothing.
"""

import importlib
import importlib.abc
import importlib.util
import re
import sys

_TORCHVISION_MODULE = re.compile(r"transformers\.models\.(?P<m>\w+)\.image_processing_(?P<n>\w+)")


def _pil_twin(fullname: str) -> str | None:
    match = _TORCHVISION_MODULE.fullmatch(fullname)
    if match is None or match["n"].startswith("pil_"):
        return None
    return f"transformers.models.{match['m']}.image_processing_pil_{match['n']}"


class _FromPilTwin(importlib.abc.Loader):
    def __init__(self, twin: str):
        self.twin = twin

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pil = importlib.import_module(self.twin)
        names = {k: v for k, v in vars(pil).items() if not k.startswith("__")}
        names.update({k.removesuffix("Pil"): v for k, v in names.items() if k.endswith("Pil")})
        vars(module).update(names)
        module.__all__ = [k.removesuffix("Pil") for k in getattr(pil, "__all__", [])]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        twin = _pil_twin(fullname)
        if twin is None or importlib.util.find_spec("torchvision") is not None:
            return None
        if importlib.util.find_spec(twin) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _FromPilTwin(twin))


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
