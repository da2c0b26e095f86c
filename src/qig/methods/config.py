"""What every method config shares, the registry of configs, and building one from named options.

Each method's own config lives beside its implementation (``qig.methods.qig``
holds ``QIGConfig`` and ``QIG``) and registers itself with
``qig.methods.base.register``; every list of methods (CLI choices, recipes,
``qig.__all__``, which methods may lend token weights) is read from
:data:`CONFIGS`. Fields are declared with :func:`qig.options.option`: their
types and ranges are checked by one validator, and ``qig quantize`` derives a
flag from each.

>>> from qig.methods import QIGConfig, AWQConfig, GPTQConfig
>>> QIGConfig(wbits=3, group_size=128).steps
2
>>> QIGConfig.compat(wbits=3).quadrature
'riemann'
>>> AWQConfig(wbits=3, quantizer="gptq").gptq_settings.damp        # AWQ's scales, then GPTQ
0.01
>>> GPTQConfig.weighted_by("qig", wbits=3).token_weights.name     # GPTQ with a QIG-weighted Hessian
'qig'
>>> QIGConfig(wbits=4, abits=8, group_size=None).label()           # weight-activation: W4A8
'W4A8 per-channel sym'
>>> config_from_options("awq", {"wbits": 3, "baseline": "zero"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
qig.errors.QigError: awq has no option --baseline (qig takes --baseline); awq's options: --abits, --act-order, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from qig.errors import QigError
from qig.options import FlatOption, Kind, check_fields, flat_options, kinds, nest, option
from qig.quant.gptq import GPTQSettings
from qig.quant.schemes import scheme_named, scheme_names
from qig.quant.spec import QuantSpec, activation_spec

WEIGHT_ONLY_ABITS = 16


@dataclass(frozen=True)
class QuantConfig:
    """Settings shared by every method.

    wbits: weight bits (2-8). group_size: input channels per scale (must divide
    every quantized linear's in_features), or None for per-channel.
    batch_size: calibration samples per forward. batch_tokens: a token budget per
    forward (samples x padded length); fewer samples go in a batch when
    batch_size of them would pass it. (No ``seed``: nothing in a run draws a
    random number; the calibration draw has its own ``calib_seed``.)
    abits: activation bits; 16 keeps activations in floating point (weight-only,
    WxA16: grouped asymmetric weights). 4-15 is a weight-activation mode (W4A8,
    W8A8, W4A4): weights per output channel, symmetric (group_size must be
    None), activations per token, symmetric, quantized at run time.
    scheme: a named setting (``qig.quant.schemes``: W4A16, FP8_DYNAMIC,
    W4AFP8, NVFP4, MXFP4, ...), which sets wbits, abits and group_size (left
    at their defaults, or given equal) and the number formats they cannot say.
    """

    name: ClassVar[str] = ""
    presets: ClassVar[tuple[str, ...]] = ()  # classmethods returning a config, e.g. QIGConfig.compat
    unused: ClassVar[tuple[str, ...]] = ()  # shared fields the method never reads: no option, refused when set

    wbits: int = option(4, "weight bits, 2-8")
    group_size: int | None = option(
        128, "input channels per weight scale, or 'channel' (W-A modes: per channel, the default there)", min=1
    )
    batch_size: int = option(16, "calibration samples per forward", min=1)
    batch_tokens: int | None = option(
        None, "token budget per calibration forward: batch_size is cut so samples x padded length fit", min=1
    )
    abits: int = option(
        WEIGHT_ONLY_ABITS,
        "activation bits, 4-16; e.g. 8 for W4A8/W8A8: per-token, dynamic (16: weight-only)",
        min=4,
        max=16,
        hint="8 for W4A8 / W8A8, 4 for W4A4; 16 keeps activations in floating point: weight-only",
    )
    scheme: str | None = option(
        None,
        "a named setting instead of --wbits/--abits/--group-size (W4A16: symmetric int4 g128; FP8_DYNAMIC; "
        "W4AFP8; NVFP4; MXFP4; ...)",
        choices=scheme_names,
    )

    def __post_init__(self) -> None:
        if isinstance(self.scheme, str):
            object.__setattr__(self, "scheme", self.scheme.upper())  # as llm-compressor's presets: any case
        check_fields(self)
        self._resolve_scheme()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in self.unused:
            if getattr(self, key) != defaults[key]:
                raise QigError(
                    f"{self.name} does not use {key} (it reads no calibration data); drop it "
                    f"(CLI: --{key.replace('_', '-')})"
                )
        if self.scheme is None and self.abits < WEIGHT_ONLY_ABITS and self.group_size is not None:
            raise QigError(
                f"abits {self.abits} quantizes weights per output channel (symmetric), so group_size "
                f"{self.group_size!r} is not allowed; pass group_size=None (CLI: --group-size channel, or leave it "
                "out), or abits=16 for grouped weight-only quantization"
            )
        self.spec  # validates bits and group size  # noqa: B018

    def samples_per_batch(self, seq_len: int) -> int:
        """Samples per calibration forward for samples padded to ``seq_len``: batch_size, cut by batch_tokens.

        >>> QuantConfig(batch_size=16, batch_tokens=4096).samples_per_batch(1000)
        4
        """
        if self.batch_tokens is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.batch_tokens // seq_len))

    def _resolve_scheme(self) -> None:
        """A scheme sets wbits, abits and group_size: defaults take its values, other values are refused."""
        if self.scheme is None:
            return
        scheme = scheme_named(self.scheme)
        defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
        wanted = {"wbits": scheme.weights.bits, "abits": scheme.abits, "group_size": scheme.weights.group_size}
        for key, value in wanted.items():
            given = getattr(self, key)
            if given == value:
                continue
            if given != defaults[key]:
                raise QigError(
                    f"scheme {self.scheme} sets {key} {value!r}, not {given!r}; drop --{key.replace('_', '-')} "
                    "(or drop --scheme and give --wbits/--abits/--group-size)"
                )
            object.__setattr__(self, key, value)

    @property
    def spec(self) -> QuantSpec:
        """The weight quantizer every step of the method uses (the scheme's; else symmetric per-channel in W-A
        modes, min-max with zero points weight-only)."""
        if self.scheme is not None:
            return scheme_named(self.scheme).weights
        return QuantSpec(bits=self.wbits, group_size=self.group_size, symmetric=self.abits < WEIGHT_ONLY_ABITS)

    @property
    def act_spec(self) -> QuantSpec | None:
        """The activation quantizer of W-A modes (per token, dynamic); None when activations stay FP (abits 16)."""
        if self.scheme is not None:
            return scheme_named(self.scheme).activations
        return activation_spec(self.abits) if self.abits < WEIGHT_ONLY_ABITS else None

    def label(self) -> str:
        """The setting in the usual notation: "W3A16 g128", "W4A8 per-channel sym", "NVFP4"."""
        if self.scheme is not None:
            return self.scheme
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.wbits}A{self.abits} {g}" + (" sym" if self.abits < WEIGHT_ONLY_ABITS else "")

    @property
    def gptq_settings(self) -> GPTQSettings | None:
        """How the layers are quantized once the method is done: GPTQ's settings, or None for round-to-nearest."""
        return None

    def to_dict(self) -> dict:
        out = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, QuantConfig) else _plain(value)
        return out


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


@dataclass(frozen=True)
class SearchConfig(QuantConfig):
    """The shared channel-scale search (METHOD.md section 4); its subclasses differ in token weights.

    n_grid: candidates r in {0, 1/n, ..., (n-1)/n}. loss: per-token error, mean
    absolute ("mae") or squared ("mse") over output channels.
    quantizer: what quantizes the layers after the scales are folded (the
    search is a transform): "rtn", or "gptq" with the ``gptq`` settings
    (plain, unweighted Hessian, from the inputs the folded layer sees).
    reference_output: in W-A modes candidates run on the quantized stream x^q
    and are scored against the FP block's output on the FP input, f(x)
    ("fp", METHOD.md section 6), or on x^q, f(x^q) ("quantized", the official
    QIG code's W4A8 choice). Weight-only searches always use f(x).
    pad_tokens: pad positions are no tokens ("skip", METHOD.md), or count as
    tokens in the channel statistic and, where the method weighs them, in the
    loss ("count": the official code, which searches on the padded batch).
    weight_clip: after each group's scale is folded, the group's linears are
    clamped per output row and weight group to the ratio of their range that
    minimises the method's token-weighted output error (``qig.methods.clip``),
    then quantized as usual; the ratios are stored with the run.
    duo_scaling: candidates ``s = m^r / w^(1-r)`` with w the group's mean
    normalised |W| per input channel (``qig.methods.search.candidate_scales``).
    """

    n_grid: int = option(20, "scale candidates of the search", min=1)
    loss: Literal["mae", "mse"] = option("mae", "per-token error of the search")
    quantizer: Literal["rtn", "gptq"] = option(
        "rtn",
        "what quantizes the layers after the search; gptq (weight-only) lifted every search wherever it ran, "
        "most at W2 (docs/results.md: ranking)",
    )
    gptq: GPTQSettings = option(GPTQSettings(), "GPTQ's settings (quantizer gptq)")  # frozen: a shared default
    reference_output: Literal["fp", "quantized"] = option(
        "fp", "W-A modes: score candidates against f(x) or f(x^q) (the official QIG code)"
    )
    pad_tokens: Literal["skip", "count"] = option(
        "skip", "pad positions in the channel statistic and the token weights (count: the official code)"
    )
    weight_clip: bool = option(
        False,
        "after each scale, search a clip ratio per output row and weight group (AWQ's auto_clip), token-weighted; "
        "regime-dependent: won at W2 per-channel with text-token sinks, lost at W2 g128 and with vision-token sinks "
        "(docs/results.md: ranking)",
    )
    duo_scaling: bool = option(
        False,
        "candidate scales m^r / w^(1-r), w: mean normalised |W| (llm-compressor's AWQ); regime-dependent: won at W2 "
        "with vision-token sinks, lost with text-token sinks and at W3 g128 (docs/results.md: ranking)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.duo_scaling and self.n_grid < 2:
            raise QigError(
                f"duo_scaling changes the candidates r > 0, and n_grid {self.n_grid} has only r = 0 (s = 1); "
                "pass n_grid 2 or more (CLI: --n-grid 20), or drop duo_scaling"
            )
        if self.reference_output != "fp" and self.abits == WEIGHT_ONLY_ABITS:
            raise QigError(
                "reference_output 'quantized' (scoring against f(x^q)) applies to weight-activation modes; "
                "pass abits below 16, or keep reference_output='fp'"
            )
        if self.quantizer == "gptq" and self.abits < WEIGHT_ONLY_ABITS:
            raise QigError(
                f"quantizer 'gptq' is weight-only here; with abits {self.abits} use quantizer='rtn' "
                "(W-A weights are rounded per output channel)"
            )
        if self.quantizer == "gptq":
            self.gptq.check(self.spec)
        elif self.gptq != GPTQSettings():
            raise QigError(
                f"GPTQ settings {self.gptq} were given but quantizer is 'rtn'; pass quantizer='gptq' "
                "(CLI: --quantizer gptq)"
            )

    @property
    def gptq_settings(self) -> GPTQSettings | None:
        return self.gptq if self.quantizer == "gptq" else None


# ---------------------------------------------------------------- the registry

CONFIGS: dict[str, type[QuantConfig]] = {}  # filled by qig.methods.base.register, in import order


def config_class(name: str) -> type[QuantConfig]:
    """The config class of a method name (the CLI's and the recipe files' only string dispatch)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise QigError(f"unknown method {name!r}; use one of: {', '.join(CONFIGS)}") from None


def token_weighting_names() -> tuple[str, ...]:
    """The methods whose token weights another method may borrow (GPTQ's Hessian): the searches."""
    return tuple(n for n, c in CONFIGS.items() if issubclass(c, SearchConfig))


def preset_names() -> tuple[str, ...]:
    """Every preset some registered config offers (``compat``)."""
    return tuple(dict.fromkeys(p for c in CONFIGS.values() for p in c.presets))


# ---------------------------------------------------------------- from named options (CLI flags, recipe keys)


def _holds_config(kind: Kind) -> bool:
    return kind.base is not None and issubclass(kind.base, QuantConfig)


def options_of(cls: type[QuantConfig]) -> dict[str, FlatOption]:
    """A method's settable options by key: its fields, nested settings flattened (``damp`` for ``gptq.damp``).

    A field holding another method's config (GPTQ's ``token_weights``) is one
    option whose value is that method's name; its fields come from the same options.
    """
    return {k: v for k, v in flat_options(cls).items() if k not in cls.unused}


def all_options() -> dict[str, FlatOption]:
    """Every option of every registered method (the first declaration of a key wins; they agree)."""
    out: dict[str, FlatOption] = {}
    for cls in CONFIGS.values():
        for key, opt in options_of(cls).items():
            out.setdefault(key, opt)
    return out


def methods_with(key: str) -> list[str]:
    """The registered methods that take option ``key``."""
    return [n for n, c in CONFIGS.items() if key in options_of(c) or key in c.presets]


def default_group_size(abits: int) -> int | None:
    """``group_size`` when none is given: the field's default (128) weight-only; per channel in W-A modes."""
    default = next(f.default for f in dataclasses.fields(QuantConfig) if f.name == "group_size")
    return default if abits == WEIGHT_ONLY_ABITS else None


def config_from_options(method: str, given: dict[str, Any]) -> QuantConfig:
    """The config of ``method`` from the options actually given, by option key: the one way a config is built.

    ``given`` holds flags, recipe keys, the keywords of :func:`make_config` or a
    saved ``to_dict()`` (``search.json``) alike. Nothing is filled in that was not
    given, except ``group_size`` in W-A modes (:func:`default_group_size`); an
    option the method does not take is refused with the list of those it does.
    A preset (``compat: True``, or ``preset: "compat"``) starts from the preset
    and the other options override it. Nested settings come flat (``damp``) or
    whole (``gptq``: a settings object or mapping). ``token_weights`` (GPTQ) is
    a config, a saved mapping, or the name of the method whose token weights
    weight the Hessian; with a name, that method's own options (e.g. ``steps``
    for qig) are given alongside.

    >>> config_from_options("qig", {"compat": True, "baseline": "quantized"}).baseline
    'quantized'
    >>> config_from_options("gptq", {"wbits": 3, "token_weights": "qig", "steps": 4}).token_weights.steps
    4
    """
    cls = config_class(method)
    given = dict(given)
    saved = given.pop("method", method)
    if saved != method:
        raise QigError(f"the options name method {saved!r}, not {method!r}")
    presets = [p for p in preset_names() if _preset_wanted(p, given.pop(p, False))]
    if "preset" in given:
        presets.append(_preset_named(cls, method, given.pop("preset")))
    whole = _whole_fields(cls, given)
    own = options_of(cls)
    inner, inner_field = _borrowed_config(cls, own, given, presets)
    unknown = [k for k in given if k not in own]
    if unknown:
        raise QigError(_no_such_options(method, unknown, own))
    if "group_size" not in given and given.get("scheme") is None:
        given["group_size"] = default_group_size(given.get("abits", WEIGHT_ONLY_ABITS))
    fields = nest(cls, given)
    if inner_field is not None and inner_field not in whole:
        fields[inner_field] = inner
    config = _with_presets(cls, method, presets, {**fields, **whole})
    for key in ("wbits", "abits", "group_size"):  # given with a scheme: equal to what the scheme sets, or refused
        if config.scheme is not None and key in given and given[key] != getattr(config, key):
            raise QigError(
                f"scheme {config.scheme} sets {key} {getattr(config, key)!r}, not {given[key]!r}; drop "
                f"--{key.replace('_', '-')} (or drop --scheme and give --wbits/--abits/--group-size)"
            )
    return config


def make_config(name: str, **fields) -> QuantConfig:
    """:func:`config_from_options` with keywords.

    >>> make_config("qig", wbits=3, steps=8).steps
    8
    >>> make_config("qig", preset="compat").steps
    32
    """
    return config_from_options(name, fields)


def _preset_named(cls: type[QuantConfig], method: str, preset: str) -> str:
    if preset not in cls.presets:
        offered = ", ".join(f"{p} ({n})" for n, c in CONFIGS.items() for p in c.presets) or "none"
        raise QigError(f"preset {preset!r} is not available for {method}; presets: {offered}")
    return preset


def _whole_fields(cls: type[QuantConfig], given: dict) -> dict:
    """The nested fields given whole (removed from ``given``): settings as an object or a mapping of its fields,
    another method's config as an object or a saved mapping (``{"method": "qig", ...}``)."""
    whole = {}
    for f in dataclasses.fields(cls):
        value, kind = given.get(f.name), kinds(cls)[f.name]
        if not (dataclasses.is_dataclass(kind.base) and isinstance(value, (dict, kind.base))):
            continue
        del given[f.name]
        if isinstance(value, kind.base):
            whole[f.name] = value
        elif issubclass(kind.base, QuantConfig):
            inner = dict(value)
            if "method" not in inner:
                raise QigError(f"{f.name} needs a 'method' (one of: {', '.join(token_weighting_names())})")
            whole[f.name] = config_from_options(inner["method"], inner)
        else:
            allowed = {g.name for g in dataclasses.fields(kind.base)}
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise QigError(
                    f"{f.name} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(allowed))}"
                )
            whole[f.name] = kind.base(**value)
    return whole


def _preset_wanted(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise QigError(f"{name} {value!r} is not supported; use true or false")
    return value


def _with_presets(cls: type[QuantConfig], method: str, presets: list[str], fields: dict) -> QuantConfig:
    for p in presets:
        if p not in cls.presets:
            raise QigError(f"--{p} is a preset of {', '.join(methods_with(p))}; method {method} has none")
    if len(presets) > 1:
        raise QigError(f"give one preset at most, not {', '.join(presets)}")
    return getattr(cls, presets[0])(**fields) if presets else cls(**fields)


def _borrowed_config(cls, own: dict[str, FlatOption], given: dict, presets: list[str]):
    """GPTQ's ``token_weights``: build the named method's config from its options in ``given`` (removed there)."""
    field = next((k for k, o in own.items() if _holds_config(o.kind)), None)
    if field is None or field not in given:
        return None, field
    name = given.pop(field)
    if name in (None, "uniform"):
        return None, field
    allowed = token_weighting_names()
    if name not in allowed:
        raise QigError(f"token weights {name!r} are not available; use one of: uniform, {', '.join(allowed)}")
    inner_cls = config_class(name)
    inner_keys = set(options_of(inner_cls)) - set(own)
    fields = {k: given.pop(k) for k in list(given) if k in inner_keys}
    fields.update({k: given[k] for k in ("wbits", "group_size") if k in given})  # the quantizer it weighs for
    inner_presets = [p for p in presets if p in inner_cls.presets]
    for p in inner_presets:
        presets.remove(p)
    return _with_presets(inner_cls, name, inner_presets, nest(inner_cls, fields)), field


def _no_such_options(method: str, unknown: list[str], own: dict[str, FlatOption]) -> str:
    """One line: what the method lacks, who has it, and every option the method does take."""
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    takers = [(flag(k), methods_with(k)) for k in unknown]
    where = "; ".join(f"{', '.join(h)} take{'s' if len(h) == 1 else ''} {f}" for f, h in takers if h)
    borrow = next((k for k, o in own.items() if _holds_config(o.kind)), None)
    lenders = [h[0] for _, h in takers if h and h[0] in token_weighting_names()]
    if borrow is not None and lenders:
        where += f"; with --method {method}, add {flag(borrow)} {lenders[0]} to use {lenders[0]}'s options"
    listing = ", ".join(sorted([o.flag for o in own.values()] + [flag(p) for p in config_class(method).presets]))
    return (
        f"{method} has no option {', '.join(flag(k) for k in unknown)}"
        + (f" ({where})" if where else "")
        + f"; {method}'s options: {listing}"
    )
