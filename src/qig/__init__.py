"""qig: post-training quantization of vision-language models with quantization-aware integrated gradients."""

__version__ = "0.1.0"
