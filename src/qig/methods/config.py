"""One frozen, validated configuration dataclass per method.

>>> from qig.methods.config import QIGConfig
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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from qig.errors import QigError
from qig.quant.gptq import GPTQSettings
from qig.quant.spec import QuantSpec, activation_spec

LOSSES = ("mae", "mse")
BASELINES = ("quantized", "zero")
CLIPS = ("iqr", "none")
QIG_TOKENS = ("all", "vision+answer")
QUADRATURES = ("gauss-legendre", "riemann")
QUANTIZERS = ("rtn", "gptq")
REFERENCE_OUTPUTS = ("fp", "quantized")


def _choice(field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise QigError(f"{field} {value!r} is not supported; use one of: {', '.join(allowed)}")


def _positive_int(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise QigError(f"{field} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Settings shared by every method.

    wbits: weight bits (2-8). group_size: input channels per scale (must divide
    every quantized linear's in_features), or None for per-channel.
    batch_size: calibration samples per forward. seed: seeds torch for the run.
    abits: activation bits; 16 keeps activations in floating point (weight-only,
    WxA16: grouped asymmetric weights). 4-15 is a weight-activation mode (W4A8,
    W8A8, W4A4): weights per output channel, symmetric (group_size must be
    None), activations per token, symmetric, quantized at run time.
    """

    name: ClassVar[str] = ""

    wbits: int = 4
    group_size: int | None = 128
    batch_size: int = 16
    seed: int = 0
    abits: int = 16

    def __post_init__(self) -> None:
        a = self.abits
        if not isinstance(a, int) or isinstance(a, bool) or not 4 <= a <= 16:
            raise QigError(
                f"abits {a!r} is not supported; use an integer from 4 to 16 (8 for W4A8 / W8A8, 4 for W4A4; "
                "16 keeps activations in floating point: weight-only)"
            )
        if a < 16 and self.group_size is not None:
            raise QigError(
                f"abits {a} quantizes weights per output channel (symmetric), so group_size {self.group_size!r} "
                "is not allowed; pass group_size=None (CLI: --group-size channel, or leave it out), "
                "or abits=16 for grouped weight-only quantization"
            )
        self.spec  # validates bits and group size  # noqa: B018
        _positive_int("batch_size", self.batch_size)
        if not isinstance(self.seed, int):
            raise QigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def spec(self) -> QuantSpec:
        """The weight quantizer every step of the method uses (symmetric per-channel in W-A modes)."""
        return QuantSpec(bits=self.wbits, group_size=self.group_size, symmetric=self.abits < 16)

    @property
    def act_spec(self) -> QuantSpec | None:
        """The activation quantizer of W-A modes (per token, dynamic); None when activations stay FP (abits 16)."""
        return activation_spec(self.abits) if self.abits < 16 else None

    def label(self) -> str:
        """The setting in the usual notation: "W3A16 g128", "W4A8 per-channel sym"."""
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.wbits}A{self.abits} {g}" + (" sym" if self.abits < 16 else "")

    @property
    def gptq_settings(self) -> GPTQSettings | None:
        """How the layers are quantized once the method is done: GPTQ's settings, or None for round-to-nearest."""
        return None

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest: no calibration, no search.

    >>> RTNConfig(wbits=4, group_size=128).name
    'rtn'
    """

    name: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class SearchConfig(QuantConfig):
    """The shared channel-scale search (METHOD.md section 4).

    n_grid: candidates r in {0, 1/n, ..., (n-1)/n}. loss: per-token error, mean
    absolute ("mae") or squared ("mse") over output channels.
    quantizer: what quantizes the layers after the scales are folded (the
    search is a transform): "rtn", or "gptq" with the ``gptq`` settings
    (plain, unweighted Hessian, from the inputs the folded layer sees).
    reference_output: in W-A modes candidates run on the quantized stream x^q
    and are scored against the FP block's output on the FP input, f(x)
    ("fp", METHOD.md section 6), or on x^q, f(x^q) ("quantized", the official
    QIG code's W4A8 choice). Weight-only searches always use f(x).
    """

    n_grid: int = 20
    loss: str = "mae"
    quantizer: str = "rtn"
    gptq: GPTQSettings = GPTQSettings()  # frozen, so a shared default is safe
    reference_output: str = "fp"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("n_grid", self.n_grid)
        _choice("loss", self.loss, LOSSES)
        _choice("quantizer", self.quantizer, QUANTIZERS)
        _choice("reference_output", self.reference_output, REFERENCE_OUTPUTS)
        if self.reference_output != "fp" and self.abits == 16:
            raise QigError(
                "reference_output 'quantized' (scoring against f(x^q)) applies to weight-activation modes; "
                "pass abits below 16, or keep reference_output='fp'"
            )
        if self.quantizer == "gptq" and self.abits < 16:
            raise QigError(
                f"quantizer 'gptq' is weight-only here; with abits {self.abits} use quantizer='rtn' "
                "(W-A weights are rounded per output channel)"
            )
        _gptq_settings(self.gptq, self.spec if self.quantizer == "gptq" else None)
        if self.quantizer == "rtn" and self.gptq != GPTQSettings():
            raise QigError(f"GPTQ settings {self.gptq} were given but quantizer is 'rtn'; pass quantizer='gptq'")

    @property
    def gptq_settings(self) -> GPTQSettings | None:
        return self.gptq if self.quantizer == "gptq" else None


@dataclass(frozen=True)
class AWQConfig(SearchConfig):
    """AWQ: every real token weighs 1.

    >>> AWQConfig(wbits=3).loss
    'mae'
    """

    name: ClassVar[str] = "awq"


@dataclass(frozen=True)
class MBQConfig(SearchConfig):
    """MBQ: answer tokens weigh 1, vision tokens rho_l (gradient ratio), the rest 0.

    grad_batch_size: samples per backward pass of the gradient pre-pass.
    """

    name: ClassVar[str] = "mbq"
    grad_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("grad_batch_size", self.grad_batch_size)


@dataclass(frozen=True)
class QIGConfig(SearchConfig):
    """QIG: tokens weighted by quantization-aware integrated gradients (METHOD.md section 5).

    baseline: reference input x' = the quantized stream ("quantized", falls back
    to zero where it equals x) or always zero ("zero"). clip: IQR clipping of the
    token scores ("iqr") or none. steps / quadrature: K points of Gauss-Legendre
    on [0, 1] or the official left-and-right Riemann grid linspace(0, 1, K) with
    weights 1/K. uniform_first_groups: the first N group searches of a run use
    uniform weights over vision and answer tokens (the official code's counter
    artefact; 0 = off). tokens: which tokens QIG attributes and weights: every
    real token ("all", METHOD.md), or only vision and answer tokens
    ("vision+answer", MBQ's token set: prompt and template tokens weigh 0).

    >>> QIGConfig(steps=8, quadrature="gauss-legendre").baseline
    'quantized'
    """

    name: ClassVar[str] = "qig"
    baseline: str = "quantized"
    clip: str = "iqr"
    steps: int = 2
    quadrature: str = "gauss-legendre"
    uniform_first_groups: int = 0
    tokens: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("baseline", self.baseline, BASELINES)
        _choice("tokens", self.tokens, QIG_TOKENS)
        _choice("clip", self.clip, CLIPS)
        _choice("quadrature", self.quadrature, QUADRATURES)
        _positive_int("steps", self.steps)
        if not isinstance(self.uniform_first_groups, int) or self.uniform_first_groups < 0:
            raise QigError(f"uniform_first_groups must be an integer >= 0, got {self.uniform_first_groups!r}")

    @classmethod
    def compat(cls, **overrides) -> QIGConfig:
        """The official code's choices, for a like-for-like comparison.

        Weight-only (abits 16): x' = 0 always, 32-point Riemann, MAE loss, the
        first five group searches with uniform weights over vision and answer
        tokens. W-A (abits < 16, e.g. W4A8): the same, except x' = x^q (the
        quantized stream), IQR bounds not applied (clip "none") and the search
        scored against f(x^q) instead of f(x).

        >>> QIGConfig.compat(wbits=4, abits=8, group_size=None).reference_output
        'quantized'
        """
        fields = dict(baseline="zero", clip="iqr", steps=32, quadrature="riemann", loss="mae", uniform_first_groups=5)
        if overrides.get("abits", 16) < 16:
            fields.update(baseline="quantized", clip="none", reference_output="quantized")
        fields.update(overrides)
        return cls(**fields)


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant (METHOD.md section 6), weight-activation modes only.

    Per scale group, ``s_c = max_t |X_tc|^alpha / max_o |W_oc|^(1 - alpha)``
    (X: the group's input on the quantized stream; W: its linears stacked),
    folded like a searched scale; then RTN W-A. No search, no gradients.

    >>> SmoothQuantConfig(wbits=8, abits=8, group_size=None).alpha
    0.5
    """

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.0 <= a <= 1.0:
            raise QigError(f"alpha must be a number in [0, 1] (0.5 is SmoothQuant's default), got {a!r}")
        if self.abits == 16:
            raise QigError(
                "smoothquant moves activation outliers into the weights for activation quantization; "
                "give it abits below 16 (e.g. abits=8 with group_size=None; CLI: --abits 8)"
            )


def _gptq_settings(value, spec: QuantSpec | None) -> None:
    """Type-check GPTQ settings; with the spec they will run with (None: unused), check the block size too."""
    if not isinstance(value, GPTQSettings):
        raise QigError(f"gptq must be a GPTQSettings(block_size=..., damp=..., act_order=...), got {value!r}")
    if spec is not None:
        value.check(spec)


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ (METHOD.md section 7): no scale search; each linear quantized with error compensation.

    gptq: block size, dampening, act-order. token_weights: None for the plain
    Hessian H = 2 X^T X (every real token weighs 1), or the config of a
    token-weighting method (``MBQConfig`` / ``QIGConfig``; ``AWQConfig``
    weighs every token 1, i.e. plain GPTQ) whose per-group token weights
    turn it into H = 2 X^T diag(w) X (METHOD.md section 5). That config's
    quantizer (wbits, group_size) must be this one's: its weights measure
    this quantizer's error. Its search fields (n_grid, loss) are unused.

    >>> GPTQConfig(wbits=3, gptq=GPTQSettings(act_order=True)).gptq_settings.act_order
    True
    """

    name: ClassVar[str] = "gptq"
    gptq: GPTQSettings = GPTQSettings()  # frozen, so a shared default is safe
    token_weights: SearchConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.abits < 16:
            raise QigError(
                f"GPTQ is weight-only here; abits {self.abits} is not available with it. Use abits=16, or "
                "rtn, smoothquant, awq, mbq or qig for weight-activation modes"
            )
        _gptq_settings(self.gptq, self.spec)
        tw = self.token_weights
        if tw is None:
            return
        if not isinstance(tw, SearchConfig):
            raise QigError(
                f"token_weights must be None (plain GPTQ) or a config of awq, mbq or qig, got {type(tw).__name__}"
            )
        if tw.spec != self.spec:
            raise QigError(
                f"token_weights {tw.name} is set for {tw.spec.label()} but GPTQ quantizes {self.spec.label()}; "
                "give both the same wbits and group_size (or use GPTQConfig.weighted_by)"
            )
        if tw.quantizer != "rtn":
            raise QigError(
                f"token_weights {tw.name} only lends its token weights; its quantizer must stay 'rtn', not "
                f"{tw.quantizer!r} (GPTQ is this config's quantizer)"
            )

    @property
    def gptq_settings(self) -> GPTQSettings:
        return self.gptq

    @classmethod
    def weighted_by(cls, method: str, wbits: int = 4, group_size: int | None = 128, **fields) -> GPTQConfig:
        """GPTQ whose Hessian is weighted by ``method``'s token weights ("awq", "mbq" or "qig").

        ``fields`` go to GPTQConfig where it has them (gptq, batch_size, seed), the rest
        to the weighting method's config (e.g. steps=8 for QIG).
        """
        own = {k: fields.pop(k) for k in ("gptq", "batch_size", "seed") if k in fields}
        if method not in ("awq", "mbq", "qig"):
            raise QigError(f"token weights {method!r} are not available; use one of: awq, mbq, qig")
        weighting = make_config(method, wbits=wbits, group_size=group_size, **fields)
        return cls(wbits=wbits, group_size=group_size, token_weights=weighting, **own)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["token_weights"] = self.token_weights.to_dict() if self.token_weights is not None else None
        return out


CONFIGS: dict[str, type[QuantConfig]] = {
    c.name: c for c in (RTNConfig, SmoothQuantConfig, AWQConfig, MBQConfig, QIGConfig, GPTQConfig)
}


def config_class(name: str) -> type[QuantConfig]:
    """The config class of a method name (the CLI's and the recipe files' only string dispatch)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise QigError(f"unknown method {name!r}; use one of: {', '.join(CONFIGS)}") from None


def make_config(name: str, **fields) -> QuantConfig:
    """Build a config from a method name and fields, refusing unknown fields with the allowed list.

    >>> make_config("qig", wbits=3, steps=8).steps
    8
    >>> make_config("qig", preset="compat").steps
    32
    """
    cls = config_class(name)
    fields = _nested(fields)
    preset = fields.pop("preset", None)
    if preset is not None:
        if cls is not QIGConfig or preset != "compat":
            raise QigError(f"preset {preset!r} is not available for {name}; the only preset is 'compat' (qig)")
        return QIGConfig.compat(**fields)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise QigError(f"{name} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(allowed))}")
    return cls(**fields)


def _nested(fields: dict) -> dict:
    """Rebuild nested settings saved as plain mappings (``to_dict`` output): gptq, token_weights."""
    fields = dict(fields)
    gptq = fields.get("gptq")
    if isinstance(gptq, dict):
        allowed = {f.name for f in dataclasses.fields(GPTQSettings)}
        unknown = sorted(set(gptq) - allowed)
        if unknown:
            raise QigError(f"gptq has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(allowed))}")
        fields["gptq"] = GPTQSettings(**gptq)
    tw = fields.get("token_weights")
    if isinstance(tw, dict):
        tw = dict(tw)
        if "method" not in tw:
            raise QigError("token_weights needs a 'method' (awq, mbq or qig)")
        fields["token_weights"] = make_config(tw.pop("method"), **tw)
    return fields
