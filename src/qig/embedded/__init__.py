"""The embedded default: a toy visual-QA world and the tiny LVLM trained on it.

``qig.embedded.world`` draws the scenes, questions and captions;
``qig.embedded.model`` builds the tiny LLaVA and locates the shipped,
trained checkpoint, the default ``--model`` of every command, and its variant
with massive activations on sink tokens (``sinks_model_dir``) and the one with
massive activations on a few vision tokens (``vsinks_model_dir``).

    >>> from qig.embedded import default_model_dir
    >>> (default_model_dir() / "config.json").is_file()
    True
"""

from qig.embedded.model import (
    IMAGE_TOKEN,
    build_model,
    build_processor,
    build_tokenizer,
    default_model_dir,
    is_embedded_model,
    plant_outlier_channels,
    sinks_model_dir,
    vsinks_model_dir,
)

__all__ = [
    "IMAGE_TOKEN",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "default_model_dir",
    "is_embedded_model",
    "plant_outlier_channels",
    "sinks_model_dir",
    "vsinks_model_dir",
]
