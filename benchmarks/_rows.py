"""The benchmarks' method rows, read from the registry (``qig.methods.CONFIGS``): one list for both scripts."""

from __future__ import annotations


def method_rows() -> list[str]:
    """One row per registered method except GPTQ, whose rows pair it with a token weighting (``gptq_rows``)."""
    from qig.methods import CONFIGS, GPTQConfig, SearchConfig

    rows = [name for name, cls in CONFIGS.items() if not issubclass(cls, GPTQConfig)]
    return sorted(rows, key=lambda name: issubclass(CONFIGS[name], SearchConfig))  # rtn, ..., then the searches


def gptq_rows() -> list[str]:
    """``gptq``, ``gptq+<w>`` (Hessian weighted by w's token weights) and ``<w>+gptq`` (w's scales, then GPTQ)."""
    from qig.methods import CONFIGS, GPTQConfig, SearchConfig

    weightings = [name for name, cls in CONFIGS.items() if issubclass(cls, SearchConfig)]
    gptq = GPTQConfig.name
    return [gptq, *(f"{gptq}+{w}" for w in weightings), *(f"{w}+{gptq}" for w in weightings)]


def row_flags(row: str) -> list[str]:
    """``qig quantize`` flags of a row: a method, "gptq+<token weights>" or "<search>+gptq"."""
    if row.startswith("gptq+"):
        return ["--method", "gptq", "--token-weights", row.split("+", 1)[1]]
    if row.endswith("+gptq"):
        return ["--method", row.split("+", 1)[0], "--quantizer", "gptq"]
    return ["--method", row]
