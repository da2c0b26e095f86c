"""qig: post-training quantization of vision-language models with quantization-aware integrated gradients.

    >>> import qig
    >>> config = qig.QIGConfig(wbits=3, group_size=128)
    >>> result = qig.quantize(model, config, calib)  # doctest: +SKIP

The public names are imported lazily, so ``import qig`` (and the CLI's
startup) does not pay for torch until they are used.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "quantize": "qig.api",
    "load_scales": "qig.api",
    "QuantizationResult": "qig.api",
    "RTNConfig": "qig.methods",
    "SmoothQuantConfig": "qig.methods",
    "AWQConfig": "qig.methods",
    "MBQConfig": "qig.methods",
    "QIGConfig": "qig.methods",
    "GPTQConfig": "qig.methods",
    "GPTQSettings": "qig.quant.gptq",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'qig' has no attribute {name!r}")
