"""What a method is: a token-weighting strategy for the shared search, and a registry.

The layer-wise pipeline builds one :class:`GroupContext` per scale group and
asks the method for token weights; the shared search (``qig.methods.search``)
does the rest. A method that does not search (RTN) says so.

    >>> from qig.methods import method_for, AWQConfig
    >>> method_for(AWQConfig(wbits=3)).finds_scales
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from qig.calib import ANSWER, PAD, VISION
from qig.errors import QigError
from qig.hostmem import HostChunks
from qig.methods.config import CONFIGS, QuantConfig
from qig.models import ScaleGroup
from qig.quant.activation import quantized_activations
from qig.quant.spec import QuantSpec

# run_block(z [k*b, T, C], chunk index, weight overrides {linear key: W} or None) -> [k*b, T, H]
BlockFn = Callable[[torch.Tensor, int, dict[str, torch.Tensor] | None], torch.Tensor]


@dataclass
class GroupContext:
    """Everything a method may look at for one scale group of one layer.

    x / xq: per calibration chunk, the input of the group's linears on the FP
    stream / the quantized stream ([b, T, C]); xq is None when the method did
    not ask for the quantized stream. roles: per chunk [b, T] (qig.calib roles).
    linears: the group's linears by their key inside the block ("" = the block).
    spec / act_spec: the weight quantizer, and the activation quantizer of W-A
    modes (None in weight-only modes). block_linears: every linear of the
    inspected block, by key inside it (None: the group's linears only).
    offloaded: x, xq and what :meth:`keep` keeps wait on the host and come to the
    device one chunk at a time, on every read (``qig.hostmem.HostChunks``; the
    memory plan decides, ``qig.pipeline.plan``).
    """

    layer_index: int
    group: ScaleGroup
    search_index: int
    x: Sequence[torch.Tensor]
    xq: Sequence[torch.Tensor] | None
    roles: list[torch.Tensor]
    linears: dict[str, torch.nn.Linear]
    run_block: BlockFn
    spec: QuantSpec
    act_spec: QuantSpec | None = None
    block_linears: dict[str, torch.nn.Linear] | None = None
    offloaded: bool = False

    def keep(self, per_chunk: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Per-chunk tensors (e.g. reference outputs) kept where the group's inputs are: a list, or on the host."""
        return HostChunks(per_chunk) if self.offloaded else list(per_chunk)

    @property
    def search_inputs(self) -> Sequence[torch.Tensor]:
        """The inputs candidates run on: x in weight-only modes, x^q in W-A modes (METHOD.md section 6)."""
        if self.act_spec is None:
            return self.x
        if self.xq is None:
            raise QigError(f"layer {self.layer_index} group {self.group.name}: W-A modes need the quantized stream")
        return self.xq

    def run_quantized(
        self,
        z: torch.Tensor,
        i: int,
        weights: dict[str, torch.Tensor],
        linears: dict[str, torch.nn.Linear] | None = None,
    ) -> torch.Tensor:
        """The block with ``linears`` (default: the group's) quantized: ``weights`` given, inputs in W-A modes.

        z: [k*b, T, C] -> [k*b, T, H]. The block's other linears stay as they are.
        """
        with quantized_activations((self.linears if linears is None else linears).values(), self.act_spec):
            return self.run_block(z, i, weights)


@dataclass
class TokenWeights:
    """Token weights of one group: per chunk [b, T] (pad = 0), and notes for the report."""

    weights: list[torch.Tensor]
    notes: dict


class Method:
    """Base class: a method weights tokens for the shared scale search.

    finds_scales: whether the method produces channel scales to fold (a search, or
    SmoothQuant's closed form); False for methods that only quantize (RTN, GPTQ).
    needs_calibration: whether a run reads calibration data (False: RTN). The one
    rule the CLI (which loads data only then and refuses calibration flags
    otherwise) and the pipeline (which runs the calibrated layer loop only then) ask;
    see :func:`needs_calibration`.
    weights_tokens: the pipeline asks for token weights per group even without
    a search (GPTQ with a weighted Hessian); searching methods always are asked.
    needs_quantized_stream: the pipeline carries x^q (inputs of the partly quantized model).
    needs_answer_gradients: before the layer loop, the pipeline computes the answer-loss
    gradient sums at every sub-layer output (``qig.pipeline.gradients``, batches of
    ``answer_gradient_batch_size`` samples) and hands them to :meth:`use_answer_gradients` (MBQ).
    """

    finds_scales: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    weights_tokens: bool = False
    needs_quantized_stream: bool = False
    needs_answer_gradients: bool = False
    answer_gradient_batch_size: int = 1

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.progress = True  # the pipeline sets it from its own ``progress`` argument

    def prepare(self, model: torch.nn.Module, family, calib, device: torch.device) -> None:
        """A pass over the whole model before the layer-wise search; default none."""

    def path_points(self) -> int:
        """Points of an integration path a calibration chunk holds at once through a block (the memory plan asks).

        0 for methods without a path; QIG's most quadrature nodes (``qig.pipeline.plan``).
        """
        return 0

    def use_answer_gradients(self, sums: dict[str, list[dict]]) -> None:
        """Take the answer-loss gradient sums (asked for by ``needs_answer_gradients``).

        sums: per sub-layer output path (``group.sublayer_output``), per layer,
        ``{"vis": sum, "n_vis": count, "ans": sum, "n_ans": count}`` of mean_h |dL/dy|
        over the vision / answer tokens of the calibration set.
        """
        raise NotImplementedError(f"{type(self).__name__} asks for no answer-loss gradients")

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        raise NotImplementedError

    def scales(self, ctx: GroupContext, weights: list[torch.Tensor]):
        """A closed-form channel scale (a ``SearchResult``) instead of the shared search; None: search."""
        return None

    def summary(self) -> dict:
        """Run-level facts for the search result (e.g. MBQ's gradient ratios)."""
        return {}


def real_tokens(roles: torch.Tensor) -> torch.Tensor:
    """Bool mask of non-pad tokens."""
    return roles != PAD


def token_mask(roles: torch.Tensor, only: tuple[int, ...] | None = None) -> torch.Tensor:
    """Bool mask of every real token, or only of the given roles: [b, T]."""
    if only is None:
        return real_tokens(roles)
    return torch.isin(roles, torch.tensor(only, dtype=roles.dtype, device=roles.device))


def uniform_weights(roles: torch.Tensor, only: tuple[int, ...] | None = None) -> torch.Tensor:
    """1 on every real token (or only on the given roles), 0 elsewhere: [b, T] float32."""
    return token_mask(roles, only).float()


def counted_tokens(roles: torch.Tensor, pad_tokens: str) -> torch.Tensor:
    """The positions that count as tokens: the real ones ("skip"), or every one, pads too ("count"): [b, T]."""
    return torch.ones_like(roles, dtype=torch.bool) if pad_tokens == "count" else real_tokens(roles)


VISION_AND_ANSWER = (VISION, ANSWER)

_REGISTRY: dict[type[QuantConfig], type[Method]] = {}


def register(config_type: type[QuantConfig]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register(AWQConfig) class AWQ(Method): ...``; the config's ``name`` joins the CLI.

    Registering a method is all it takes to make it a ``qig quantize --method``
    choice, a recipe ``method``, and (for a ``SearchConfig``) a token weighting
    GPTQ may borrow.
    """
    if not config_type.name:
        raise QigError(f"{config_type.__name__} needs a class attribute name = '...' to be registered")

    def deco(cls: type[Method]) -> type[Method]:
        _REGISTRY[config_type] = cls
        CONFIGS[config_type.name] = config_type
        return cls

    return deco


def needs_calibration(config_or_name: QuantConfig | str) -> bool:
    """Whether the method of a config (or of a method name) reads calibration data (its ``needs_calibration``).

    >>> needs_calibration("rtn"), needs_calibration("awq"), needs_calibration("gptq")
    (False, True, True)
    """
    config_type = CONFIGS.get(config_or_name) if isinstance(config_or_name, str) else type(config_or_name)
    cls = _REGISTRY.get(config_type)
    if cls is None:
        raise QigError(f"no method is registered for {config_or_name!r}; registered: {', '.join(CONFIGS)}")
    return cls.needs_calibration


def method_for(config: QuantConfig) -> Method:
    """The method instance for a config, by the config's type."""
    cls = _REGISTRY.get(type(config))
    if cls is None:
        known = ", ".join(t.__name__ for t in _REGISTRY)
        raise QigError(f"no method is registered for {type(config).__name__}; registered configs: {known}")
    return cls(config)
