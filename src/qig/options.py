"""Typed option fields: one declaration drives validation, CLI flags and recipe keys.

A config (or any frozen dataclass of settings) declares each field with
:func:`option`: its default, a help text, and a range where one applies. The
type hint says the rest: ``int``, ``float``, ``bool``, ``str``,
``Literal[...]`` (the allowed choices), ``X | None``, or a nested dataclass.
:func:`check_fields` validates every field from those hints, so no class
repeats a type check; ``qig quantize`` builds its flags from the same fields
(:func:`flat_options`), and a recipe's keys are the same names.

    >>> from dataclasses import dataclass
    >>> from typing import Literal
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     steps: int = option(2, "path points", min=1)
    ...     rule: Literal["a", "b"] = option("a", "path rule")
    ...     def __post_init__(self):
    ...         check_fields(self)
    >>> Demo(steps=0)
    Traceback (most recent call last):
    ...
    qig.errors.QigError: steps 0 is not supported; use an integer >= 1
    >>> Demo(rule="c")
    Traceback (most recent call last):
    ...
    qig.errors.QigError: rule 'c' is not supported; use one of: a, b
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qig.errors import QigError


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    hint: str | Callable[[], str] | None = None,
    choices: Callable[[], tuple[str, ...]] | None = None,
    required: bool = False,
    positional: bool = False,
    path: bool = False,
) -> Any:
    """A dataclass field with its help, range (``min``/``max``, inclusive) and an optional hint for errors.

    choices: for ``str`` fields whose allowed values are only known at run
    time (e.g. the registered methods), a function returning them; ``hint``
    may be such a function too. required / positional: how a command line
    takes it (``qig.commands.flags``); a required option's default is None.
    path: a file or folder name, checked by :func:`check_path`.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "hint": hint,
        "choices": choices,
        "required": required,
        "positional": positional,
        "path": path,
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Kind:
    """What a type hint allows: the base type, Literal choices, whether None is allowed."""

    base: type | None  # int, float, bool, str, or a class (nested settings, a config); None: anything
    choices: tuple | None = None
    optional: bool = False


@functools.cache
def kinds(cls: type) -> dict[str, Kind]:
    """The :class:`Kind` of every field of a dataclass, read from its type hints (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _kind(hint) -> Kind:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        inner = _kind(rest[0]) if len(rest) == 1 else Kind(None)
        return dataclasses.replace(inner, optional=True)
    if origin is Literal:
        return Kind(type(args[0]), choices=args)
    return Kind(hint if isinstance(hint, type) else None)


def check_fields(obj) -> None:
    """Validate every field of a dataclass instance against its type hint and its :func:`option` range."""
    for f in dataclasses.fields(obj):
        check_value(f, kinds(type(obj))[f.name], getattr(obj, f.name))


def check_value(f: dataclasses.Field, kind: Kind, value) -> None:
    """Refuse ``value`` for field ``f`` unless it fits its kind; the error names what is allowed."""
    if value is None and kind.optional:
        return
    meta = f.metadata
    choices = kind.choices or (meta["choices"]() if meta.get("choices") else None)
    if choices is not None:
        ok = value in choices and type(value) is type(choices[0])
        expected = "one of: " + ", ".join(map(str, choices))
    elif kind.base is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif kind.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and _in_range(value, meta)
        expected = _range_words("an integer", meta)
    elif kind.base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and _in_range(value, meta)
        expected = _range_words("a number", meta)
    elif kind.base is str:
        ok, expected = isinstance(value, str), "a string"
    elif kind.base is not None:
        ok, expected = isinstance(value, kind.base), f"a {kind.base.__name__}"
    else:
        return
    if kind.optional:
        expected += " (or none)"
    if ok and meta.get("path"):
        check_path(value, f.name)
    if not ok:
        hint = meta.get("hint")
        hint = f" ({hint() if callable(hint) else hint})" if hint else ""
        raise QigError(f"{f.name} {value!r} is not supported; use {expected}{hint}")


NAME_MAX, PATH_MAX = 255, 4096  # bytes: the longest file name and path Linux file systems take


def check_path(value: str, name: str) -> None:
    """Refuse a path the operating system cannot take (a NUL byte, a name over 255 bytes), naming the option.

    >>> check_path("out/" + "x" * 300, "output")
    Traceback (most recent call last):
    ...
    qig.errors.QigError: output: the name 'xxxxxxxxxxxxxxxxxxxx...' is 300 bytes long; file systems take at most 255
    """
    if "\0" in value:
        raise QigError(f"{name} {value!r} holds a NUL character, which no file name can hold")
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise QigError(f"{name} {value!r} is not a valid file name (lone surrogate characters)") from None
    if len(raw) > PATH_MAX:
        raise QigError(f"{name}: the path is {len(raw)} bytes long; file systems take at most {PATH_MAX}")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            shown = part[:20].decode("utf-8", "replace") + "..."
            raise QigError(
                f"{name}: the name {shown!r} is {len(part)} bytes long; file systems take at most {NAME_MAX}"
            )


def _in_range(value, meta) -> bool:
    lo, hi = meta.get("min"), meta.get("max")
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _range_words(what: str, meta) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}" if what == "an integer" else f"{what} in [{lo}, {hi}]"
    if lo is not None:
        return f"{what} >= {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what


@dataclass(frozen=True)
class FlatOption:
    """One settable name of a settings class: a field, or a field of a nested settings dataclass.

    key: the name recipes and ``build`` use (a nested field's own name, e.g.
    ``damp`` for ``gptq.damp``); parent: the outer field holding the nested
    settings, or None.
    """

    key: str
    field: dataclasses.Field
    kind: Kind
    parent: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def flat_options(cls: type, skip: Callable[[Kind], bool] = lambda k: False) -> dict[str, FlatOption]:
    """Every option of a settings dataclass by key; nested settings dataclasses are flattened one level.

    skip: kinds left out (e.g. fields holding a whole other config).
    """
    out: dict[str, FlatOption] = {}
    for f in dataclasses.fields(cls):
        kind = kinds(cls)[f.name]
        if skip(kind):
            continue
        if kind.base is not None and dataclasses.is_dataclass(kind.base) and not kind.optional:
            for inner in dataclasses.fields(kind.base):
                out[inner.name] = FlatOption(inner.name, inner, kinds(kind.base)[inner.name], parent=f.name)
        else:
            out[f.name] = FlatOption(f.name, f, kind)
    return out


def nest(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Fields for ``cls(**...)`` from flat option values: nested settings rebuilt from their keys."""
    options = flat_options(cls)
    fields: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        opt = options[key]
        if opt.parent is None:
            fields[key] = value
        else:
            nested.setdefault(opt.parent, {})[key] = value
    hints = kinds(cls)
    for parent, inner in nested.items():
        fields[parent] = hints[parent].base(**inner)
    return fields


def read_recipe(path: str, known: list[str]) -> dict[str, Any]:
    """A YAML recipe's keys and values (keys are flag names, ``-`` read as ``_``); a key not in ``known`` is refused.

    >>> read_recipe("recipes/qwen2-vl-7b-w3g128.yaml", ["model", "calib", "image_folder", "n_samples", "method",
    ...     "wbits", "group_size", "device"])["wbits"]
    3
    """
    import yaml

    check_path(path, "--recipe")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise QigError(f"recipe {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise QigError(f"recipe {path} is a folder; pass a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise QigError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a YAML file") from exc
    except OSError as exc:
        raise QigError(f"recipe {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QigError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise QigError(f"recipe {path} nests too deeply to be a recipe (a mapping of option: value)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QigError(f"recipe {path} must be a mapping of options (e.g. 'method: qig'), got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise QigError(f"recipe {path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return data
