"""qig: post-training quantization of vision-language models with quantization-aware integrated gradients.

    >>> import qig
    >>> config = qig.QIGConfig(wbits=3, group_size=128)
    >>> result = qig.quantize(model, config, calib)  # doctest: +SKIP
    >>> "AWQConfig" in qig.__all__
    True

The public names are imported lazily, so ``import qig`` does not pay for
torch until they are used. The ``qig`` command does import torch at start-up:
its parser is built from every method's config fields (``qig.methods.config``,
whose quantizer specs are torch code) and the calibration defaults
(``qig.calib``). Every registered method's config class is a public name
(``qig.methods.CONFIGS``).
"""

__version__ = "0.1.0"

_PUBLIC = {
    "quantize": "qig.api",
    "load_scales": "qig.api",
    "QuantizationResult": "qig.api",
    "GPTQSettings": "qig.quant.gptq",
}


def _configs() -> dict:
    from qig.methods import CONFIGS

    return {cls.__name__: cls for cls in CONFIGS.values()}


def __getattr__(name: str):
    if name == "__all__":
        return sorted([*_PUBLIC, *_configs()])
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name.endswith("Config") and name in (configs := _configs()):
        return configs[name]
    raise AttributeError(f"module 'qig' has no attribute {name!r}")
