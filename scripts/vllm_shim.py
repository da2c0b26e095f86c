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

Video processors have no PIL twin: transformers builds every one of them on
torchvision, so without it ``AutoVideoProcessor.from_pretrained`` raises
("requires `torchvision`") and with it the whole processor of Qwen2/2.5/3-VL,
LLaVA-OneVision, InternVL and SmolVLM. While torchvision is absent, that
failure is answered with :class:`NoVideo`, a video processor that refuses
videos; images are untouched. scripts/check_vllm.sh --families serves with
``limit_mm_per_prompt={"video": 0}``, so vLLM never asks it for a video. A
``transformers.models.M.video_processing_M`` module that fails to import for
want of torchvision (vLLM's interns1.py imports InternVL's at the top) becomes
one whose ``...VideoProcessor`` names are that stand-in.
scripts/check_vllm.sh --families also puts this file on the project venv's
path (as ``sitecustomize``) so ``qig`` loads those folders' processors.
"""

import importlib
import importlib.abc
import importlib.machinery
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
        video = _VIDEO_MODULE.fullmatch(fullname)
        if video and video["m"] != "auto" and importlib.util.find_spec("torchvision") is None:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            return None if spec is None or spec.loader is None else _or_no_video(spec)
        twin = _pil_twin(fullname)
        if twin is None or importlib.util.find_spec("torchvision") is not None:
            return None
        if importlib.util.find_spec(twin) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _FromPilTwin(twin))


_VIDEO_MODULE = re.compile(r"transformers\.models\.(?P<m>\w+)\.video_processing_(?P<n>\w+)")
# What the stand-in copies from the folder's image processor: vLLM's Qwen3-VL and InternVL processing read them.
_SHARED = ("size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")


def _no_video_processor():
    """A stand-in video processor class (as tests/models/_families.py's): images only, videos refused.

    Built with the folder's image-processor settings (``_SHARED``), as a real video processor defaults to them.
    """
    import json
    from pathlib import Path

    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):  # unexported without torchvision: the processor check needs it
        transformers.VideoProcessorMixin = VideoProcessorMixin

    class NoVideo(VideoProcessorMixin):
        merge_size = 2
        temporal_patch_size = 2
        patch_size = 14
        size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        num_frames = fps = None
        min_frames, max_frames = 1, 1

        def __init__(self, **kwargs):
            super().__init__()
            for key, value in kwargs.items():
                setattr(self, key, value)

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            settings = {}
            for name in ("processor_config.json", "preprocessor_config.json"):
                file = Path(path) / name
                if file.is_file():
                    config = json.loads(file.read_text())
                    config = config.get("image_processor", config)
                    settings.update({k: config[k] for k in _SHARED if k in config})
            settings.update({k: v for k, v in kwargs.items() if k in _SHARED})
            return cls(**settings)

        def preprocess(self, *args, **kwargs):
            raise RuntimeError("no video processor here: transformers' video processors need torchvision")

    return NoVideo


def _or_no_video(spec):
    """``spec`` with its loader's exec_module falling back, on a missing torchvision, to a module whose every
    ``...VideoProcessor`` name is the stand-in (vLLM's interns1.py imports InternVLVideoProcessor at the top)."""
    exec_module = spec.loader.exec_module

    def exec_or_stand_in(module):
        try:
            exec_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("torchvision"):
                raise

            def __getattr__(name):
                if name.endswith("VideoProcessor"):
                    return _no_video_processor()
                raise AttributeError(f"module {module.__name__!r} (a stand-in: no torchvision) has no {name!r}")

            module.__getattr__ = __getattr__

    spec.loader.exec_module = exec_or_stand_in
    return spec


def _patch_auto_video_processor(module) -> None:
    auto = vars(module)["AutoVideoProcessor"]  # through vars(): a class attribute read may hit the backend check
    original = vars(auto)["from_pretrained"].__func__

    def from_pretrained(cls, *args, **kwargs):
        try:
            return original(cls, *args, **kwargs)
        except ValueError:
            if importlib.util.find_spec("torchvision") is not None:
                raise
            return _no_video_processor().from_pretrained(*args, **kwargs)

    type.__setattr__(auto, "from_pretrained", classmethod(from_pretrained))
    if type(auto) is not type:  # transformers' DummyObject metaclass: any attribute read raises without torchvision
        type.__setattr__(auto, "__class__", type)


def _real_auto_video_processor(module) -> None:
    """``transformers.AutoVideoProcessor`` is a placeholder without torchvision (its lazy import table lists it under
    that backend); vLLM imports it from there (vllm/transformers_utils/processor.py). Point it at the real class."""
    auto = importlib.import_module("transformers.models.auto.video_processing_auto")  # patched by _PatchOnImport
    transformers = sys.modules[module.__name__]  # transformers' __init__ puts a lazy module in its own place
    transformers.AutoVideoProcessor = vars(auto)["AutoVideoProcessor"]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Once transformers (or its video_processing_auto module) is imported, patches AutoVideoProcessor (above)."""

    TARGETS = {
        "transformers": _real_auto_video_processor,
        "transformers.models.auto.video_processing_auto": _patch_auto_video_processor,
    }

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.TARGETS or importlib.util.find_spec("torchvision") is not None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module
        patch = self.TARGETS[fullname]

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchOnImport())
