"""Command-line flags derived from option dataclasses (``qig.options``): one declaration, one validator.

Each command declares its options as a frozen dataclass whose fields use
``qig.options.option``; :func:`add_flags` turns every field into a flag (type,
choices, help and default from the field), a flag left out leaving no attribute
(argparse's ``SUPPRESS``) so that "given" and "default" stay apart even for a
value that is None on purpose (``--group-size channel``), and :func:`from_args`
builds the validated dataclass from the flags actually given.

    >>> import argparse
    >>> from dataclasses import dataclass
    >>> from qig.options import check_fields, option
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     n: int = option(3, "how many", min=1)
    ...     def __post_init__(self):
    ...         check_fields(self)
    >>> parser = argparse.ArgumentParser()
    >>> _ = add_flags(parser, Demo)
    >>> from_args(parser.parse_args(["--n", "5"]), Demo).n
    5
    >>> from_args(parser.parse_args(["--n", "0"]), Demo)
    Traceback (most recent call last):
    ...
    qig.errors.QigError: n 0 is not supported; use an integer >= 1
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from qig.errors import QigError
from qig.options import FlatOption, flat_options


def add_flags(parser, cls: type, types: dict[str, Any] | None = None) -> dict[str, FlatOption]:
    """A flag per option of ``cls`` (nested settings flattened); returns the options by key.

    types: a parser per key where the field's own type does not read a command line (``group_size``: 'channel').
    """
    options = flat_options(cls)
    for key, opt in options.items():
        add_flag(parser, opt, **({"type": types[key]} if types and key in types else {}))
    return options


def add_flag(parser, opt: FlatOption, suffix: str = "", **overrides: Any) -> None:
    """One flag for one option: type, choices and help from the field; left out, it sets nothing (``SUPPRESS``)."""
    kind, meta = opt.kind, opt.field.metadata
    help_text = meta.get("help") or opt.key.replace("_", " ")
    default = opt.field.default
    if default not in (None, False, dataclasses.MISSING) and not dataclasses.is_dataclass(default):
        help_text += f" (default {default})"
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": (help_text + suffix).replace("%", "%%")}
    if kind.base is bool:
        kw["action"] = "store_true"
    elif kind.choices or meta.get("choices"):
        kw["choices"] = kind.choices or meta["choices"]()
    elif kind.base in (int, float):
        kw["type"] = kind.base
    kw.update(overrides)
    if meta.get("positional"):
        kw.pop("default")
        parser.add_argument(opt.key, **kw)
        return
    if meta.get("required"):
        kw["required"] = True
    parser.add_argument(opt.flag, **kw)


def given(args, options: dict[str, FlatOption]) -> dict[str, Any]:
    """The options given on the command line (a flag left out is absent, not its default)."""
    return {k: getattr(args, k) for k in options if hasattr(args, k)}


def from_args(args, cls: type):
    """The validated options dataclass from the flags given; the rest keep the field defaults."""
    values = given(args, flat_options(cls))
    try:
        return cls(**values)
    except TypeError as exc:  # a field without a default that was not given
        raise QigError(f"missing option: {exc}") from exc
