"""Token-sensitivity maps: the token weights of AWQ, MBQ and QIG per layer and group, and their statistics.

Weights are compared on one scale: a token's weight divided by the mean
weight of its sample's real tokens ("times uniform"), so AWQ's weights are 1
everywhere and 2 means twice AWQ's share. Statistics:

- share: the fraction of the total weight carried by vision, prompt and
  answer tokens, per method, layer and group;
- spread: quantiles of the times-uniform weights inside each role (the token
  variability inside a modality);
- entropy: per sample, the entropy of the weight distribution over its real
  tokens (and over its vision tokens) relative to the uniform one's:
  1.0 = uniform, lower = concentrated.

    >>> maps = compute_token_maps(model, processor, calib, layers=[0, 3, 5])  # doctest: +SKIP
    >>> maps.entropy()[0]["qig"]["0.attn_in"]["vision"]  # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from qig.calib import ANSWER, PAD, PROMPT, ROLE_NAMES, VISION, CalibrationSet
from qig.errors import QigError
from qig.tokenmaps.grid import ImageTokens, image_tokens

log = logging.getLogger(__name__)

METHODS = ("awq", "mbq", "qig")
ROLES = {VISION: "vision", PROMPT: "prompt", ANSWER: "answer"}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class TokenMaps:
    """Per-token weights of one or more methods for a set of samples.

    weights: {(method, layer, group): [N, T]} (pad = 0). roles / input_ids: [N, T].
    layers: every layer with weights (the depth axis); shown: the layers pictured per sample.
    tokens: per sample, the display text of each of its T positions. images: per sample,
    its images with their vision tokens on the patch grid. meta: per sample (id, type, ...).
    """

    weights: dict[tuple[str, int, str], torch.Tensor]
    roles: torch.Tensor
    input_ids: torch.Tensor
    tokens: list[list[str]]
    images: list[list[ImageTokens]]
    meta: list[dict]
    layers: list[int]
    shown: list[int]
    groups: list[str]
    methods: list[str]
    info: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.roles.shape[0])

    def get(self, method: str, layer: int, group: str) -> torch.Tensor | None:
        return self.weights.get((method, layer, group))

    def relative(self, method: str, layer: int, group: str) -> torch.Tensor:
        """Weights divided by the mean weight of each sample's real tokens: [N, T] (pad = 0)."""
        return relative_to_uniform(self.weights[(method, layer, group)], self.roles != PAD)

    def shares(self) -> dict:
        """{method: {"layer.group": {role: share of the total weight}}}, over all samples."""
        out: dict = {}
        for (method, layer, group), w in self.weights.items():
            total = float(w.double().sum()) or 1.0
            out.setdefault(method, {})[f"{layer}.{group}"] = {
                name: float(w[self.roles == code].double().sum()) / total for code, name in ROLES.items()
            }
        return out

    def spread(self) -> dict:
        """{method: {"layer.group": {role: {q05..q95, cv}}}} of the times-uniform weights inside each role."""
        out: dict = {}
        for method, layer, group in self.weights:
            rel = self.relative(method, layer, group)
            per_role = {}
            for code, name in ROLES.items():
                vals = rel[self.roles == code].double()
                if vals.numel() == 0:
                    continue
                q = torch.quantile(vals, torch.tensor(QUANTILES, dtype=vals.dtype))
                mean = float(vals.mean())
                stats = {f"q{round(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q, strict=True)}
                stats["cv"] = float(vals.std(unbiased=False)) / mean if mean > 0 else 0.0
                per_role[name] = stats
            out.setdefault(method, {})[f"{layer}.{group}"] = per_role
        return out

    def entropy(self) -> list[dict]:
        """Per sample: {method: {"layer.group": {"all": H/H_uniform, "vision": ..., "kl_bits": ..., "*_effective"}}}."""
        out = []
        for i in range(self.n_samples):
            per_method: dict = {}
            real = self.roles[i] != PAD
            vision = self.roles[i] == VISION
            for (method, layer, group), w in self.weights.items():
                h = relative_entropy(w[i], real)
                entry = {"all": h, "all_effective": effective_share(h, int(real.sum()))}
                entry["kl_bits"] = kl_from_uniform_bits(w[i], real)
                if bool(vision.any()):
                    h = relative_entropy(w[i], vision)
                    entry["vision"] = h
                    entry["vision_effective"] = effective_share(h, int(vision.sum()))
                    entry["vision_kl_bits"] = kl_from_uniform_bits(w[i], vision)
                per_method.setdefault(method, {})[f"{layer}.{group}"] = entry
            out.append(per_method)
        return out

    def entropy_of(self, method: str, layer: int, group: str, i: int, over: str = "vision") -> float:
        """Relative entropy (1 = uniform) of sample i's weights over its "vision" or "all" real tokens."""
        mask = self.roles[i] == VISION if over == "vision" else self.roles[i] != PAD
        return relative_entropy(self.weights[(method, layer, group)][i], mask)

    def to_json(self) -> dict:
        """Everything but the tensors: samples, tokens, grid, statistics, entropy."""
        entropy = self.entropy()
        samples = []
        for i in range(self.n_samples):
            real = (self.roles[i] != PAD).nonzero().flatten().tolist()
            samples.append(
                {
                    **self.meta[i],
                    "tokens": [self.tokens[i][p] for p in real],
                    "roles": [ROLE_NAMES[int(self.roles[i, p])] for p in real],
                    "images": [
                        {
                            "rows": im.grid.rows,
                            "cols": im.grid.cols,
                            "height": im.grid.height,
                            "width": im.grid.width,
                            "positions": im.positions.tolist(),
                        }
                        for im in self.images[i]
                    ],
                    "entropy": entropy[i],
                }
            )
        return {
            "format": "qig-token-maps-1",
            "info": self.info,
            "methods": self.methods,
            "layers": self.layers,
            "shown_layers": self.shown,
            "groups": self.groups,
            "weight_scale": "times uniform: a token's weight / the mean weight of its sample's real tokens",
            "entropy_scale": "all / vision: entropy of the weights over the sample's real / vision tokens divided by "
            "log(number of tokens), 1 = uniform; *_effective: exp(entropy) / number of tokens, the share of the "
            "tokens the weight effectively spreads over; *kl_bits: KL(weights || uniform) in bits",
            "shares": self.shares(),
            "spread": self.spread(),
            "samples": samples,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """``weights.<method>.<layer>.<group>`` [N, T], ``roles`` and ``input_ids`` [N, T]."""
        out = {f"weights.{m}.{layer}.{g}": w.float().contiguous() for (m, layer, g), w in self.weights.items()}
        out["roles"] = self.roles.to(torch.int8).contiguous()
        out["input_ids"] = self.input_ids.to(torch.int64).contiguous()
        return out


def relative_to_uniform(w: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """w / mean of w over each row's real tokens: [N, T] -> [N, T] float32 (0 off the real tokens)."""
    w = w.float() * real.float()
    mean = w.sum(-1, keepdim=True) / real.float().sum(-1, keepdim=True).clamp(min=1)
    return torch.where(mean > 0, w / mean.clamp(min=1e-30), torch.zeros_like(w))


def relative_entropy(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Entropy of w restricted to ``mask`` (renormalised) over log(#mask): 1 = uniform, 0 = one token."""
    vals = w.double()[mask]
    n = vals.numel()
    total = float(vals.sum())
    if n <= 1 or total <= 0:
        return 1.0
    p = vals / total
    h = -float((p[p > 0] * p[p > 0].log()).sum())
    return h / math.log(n)


def effective_share(relative_h: float, n: int) -> float:
    """The fraction of the n tokens the weights effectively spread over: exp(H) / n (1 = uniform)."""
    return math.exp(relative_h * math.log(n)) / n if n > 1 else 1.0


def kl_from_uniform_bits(w: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(w || uniform) over the masked tokens in bits: log2(n) - H(w)."""
    vals = w.double()[mask]
    n, total = vals.numel(), float(vals.sum())
    if n <= 1 or total <= 0:
        return 0.0
    p = vals / total
    h = -float((p[p > 0] * p[p > 0].log2()).sum())
    return math.log2(n) - h


def display_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Readable text of each token: byte-level / sentencepiece markers decoded, newline ↵, blank ␣."""
    out = []
    for tok in tokenizer.convert_ids_to_tokens(ids):
        tok = "?" if tok is None else str(tok)
        try:
            text = tokenizer.convert_tokens_to_string([tok])
        except (TypeError, ValueError, KeyError):
            text = tok
        text = text.replace("\n", "↵").strip() or "␣"
        out.append(text)
    return out


def from_calibration(
    calib: CalibrationSet,
    processor,
    model_config,
    weights: dict[tuple[str, int, str], torch.Tensor],
    shown: list[int],
    meta: list[dict] | None = None,
    info: dict | None = None,
    n_samples: int | None = None,
) -> TokenMaps:
    """Maps for the first ``n_samples`` samples of ``calib`` from weights [N, T] keyed (method, layer, group)."""
    if not weights:
        raise QigError("there are no token weights to map; the run searched no group (RTN or applied scales?)")
    n = len(calib) if n_samples is None else min(n_samples, len(calib))
    roles = calib.roles[:n]  # [n, T]
    T = roles.shape[1]
    tok = getattr(processor, "tokenizer", processor)
    ids = torch.full((n, T), calib.pad_token_id, dtype=torch.int64)
    tokens, images = [], []
    for i, s in enumerate(calib.samples[:n]):
        row = s.inputs["input_ids"][0]
        ids[i, : row.numel()] = row
        tokens.append(display_tokens(tok, ids[i].tolist()))
        images.append(image_tokens(model_config, processor, s.inputs, s.roles))
    for key, w in weights.items():
        if w.shape[1] != T or w.shape[0] < n:
            raise QigError(f"token weights {key} have shape {tuple(w.shape)}; expected [>= {n}, {T}] (calibration)")
    weights = {k: w[:n].float() for k, w in weights.items()}
    layers = sorted({layer for _, layer, _ in weights})
    groups = list(dict.fromkeys(g for _, _, g in weights))
    methods = [m for m in METHODS if any(k[0] == m for k in weights)]
    methods += sorted({k[0] for k in weights} - set(methods))
    if meta is None:
        meta = [{"id": s.id} for s in calib.samples[:n]]
    return TokenMaps(
        weights=weights,
        roles=roles,
        input_ids=ids,
        tokens=tokens,
        images=images,
        meta=meta[:n],
        layers=layers,
        shown=[layer for layer in shown if layer in layers] or layers[:1],
        groups=groups,
        methods=methods,
        info=dict(info or {}),
    )
