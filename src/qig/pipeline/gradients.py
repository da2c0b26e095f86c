"""MBQ's answer-loss gradients, one decoder layer at a time, and the methods' pre-pass.

MBQ weighs vision tokens by rho_l, the ratio of mean_h |dL/dy| over vision and
over answer tokens at each sub-layer's output linear (``group.sublayer_output``:
o_proj, down_proj), where L is the SFT loss on the answer tokens (METHOD.md
section 4). Back-propagating it through the whole model needs every decoder
layer on the device at once; :func:`answer_gradients` splits the backward pass
at the layer boundaries instead, each layer on the device only while it is
visited (``DecoderLayers.onload``: up 0..L-2, then down L-1..0, once each):

1. forward, layers 0..L-2 under no_grad (from the captured inputs of layer 0),
   storing the input of every layer per calibration chunk, on the host;
2. the top: layer L-1 recomputed on its stored input with grad, then the head.
   The head is the model's own forward (embeddings and vision tower again, no
   grad needed there; final norm, lm_head, any softcapping) with its decoder
   layers swapped for stand-ins that pass hidden states on, except the top one,
   which returns layer L-1's output; the loss is the mean cross-entropy over the
   chunk's answer tokens, differentiated back to layer L-1's input;
3. backward, layers L-2..0: layer l recomputed on its stored input with grad,
   and ``torch.autograd.grad(out, x, grad_out)`` pulls the gradient at its
   output (the input gradient of layer l+1) back to its input.

Hooks on the sub-layer output linears accumulate, as the gradient passes, the
sums a whole-model backward accumulates (the reference the tests compare
against): by the chain rule they are equal to float tolerance. What the model
adds between layers (Qwen3-VL's DeepStack) is replayed as a constant, which
leaves the gradient unchanged. Parameters get no gradient (every gradient is
taken with respect to a layer input only).

Memory: the stored layer inputs are L x N x T x C values in the hidden states'
dtype (L decoder layers, N calibration samples, T the padded length, C the
hidden size), on the host, moved to the device one
chunk at a time; plus one layer's worth of gradients (N x T x C) and, on the
device, one layer, one chunk's graph and the model outside its decoder layers.

    >>> layers = InMemoryLayers(model, family)  # doctest: +SKIP
    >>> sums = answer_gradients(model, family, calib, layers, torch.device("cuda"), batch_size=4)  # doctest: +SKIP
    >>> sums["self_attn.o_proj"][0]  # doctest: +SKIP
    {'vis': 0.021, 'n_vis': 288, 'ans': 0.35, 'n_ans': 40}
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from qig.calib import ANSWER, VISION, CalibrationSet
from qig.dist import current, ordered
from qig.errors import QigError
from qig.methods import Method
from qig.models import ModelFamily, get_module
from qig.pipeline.capture import Chunk, capture, next_input
from qig.pipeline.layers import DecoderLayers
from qig.pipeline.loop import frozen

log = logging.getLogger(__name__)

HOST = torch.device("cpu")  # where the layer inputs and gradients wait between their layer's visits

# Per sub-layer output path, per layer: sums of mean_h |dL/dy| over vision / answer tokens, and their counts.
GradientSums = dict[str, list[dict]]


def prepare_methods(
    model: torch.nn.Module,
    family: ModelFamily,
    methods: Sequence[Method],
    calib: CalibrationSet,
    layers: DecoderLayers,
    device: str | torch.device,
    progress: bool = True,
) -> None:
    """Every method's ``prepare``; then the answer-loss gradients for the methods that need them (MBQ).

    The gradients are computed layer-wise once per gradient batch size asked
    for (once, for one MBQ method or MBQ-weighted GPTQ) and handed to each of
    those methods' ``use_answer_gradients``.

        >>> prepare_methods(model, family, [method_for(MBQConfig(wbits=3))], calib, layers, "cpu")  # doctest: +SKIP
    """
    device = torch.device(device)
    by_batch: dict[int, list[Method]] = {}
    for m in methods:
        m.progress = progress
        m.prepare(model, family, calib, device)
        if m.needs_answer_gradients:
            by_batch.setdefault(m.answer_gradient_batch_size, []).append(m)
    for batch_size, wanting in by_batch.items():
        sums = answer_gradients(model, family, calib, layers, device, batch_size, progress)
        for m in wanting:
            m.use_answer_gradients(sums)


def answer_gradients(
    model: torch.nn.Module,
    family: ModelFamily,
    calib: CalibrationSet,
    layers: DecoderLayers,
    device: str | torch.device,
    batch_size: int,
    progress: bool = True,
) -> GradientSums:
    """Sums of mean_h |dL/dy| at every sub-layer output over vision / answer tokens, one layer at a time.

    The loss of each batch of ``batch_size`` samples is the mean cross-entropy
    over its answer tokens; the result equals a whole-model backward's to float
    tolerance. Batches without answer tokens add nothing.

        >>> sums = answer_gradients(model, family, calib, InMemoryLayers(model, family), "cpu", 4)  # doctest: +SKIP
    """
    device = torch.device(device)
    paths = sublayer_outputs(family)
    n = len(layers)
    sums = _empty_sums(paths, n)
    chunks = capture(model, family, calib, batch_size, device)  # this rank's chunks
    mine = set(current().mine(calib.n_batches(batch_size)))
    batches = [b for i, b in enumerate(calib.batches(batch_size)) if i in mine]
    with tqdm(total=2 * n - 1, desc="MBQ gradients (layers)", leave=False, disable=not progress) as bar:
        stored: list[list[torch.Tensor] | None] = _layer_inputs(layers, chunks, device, bar)  # [layer][chunk]
        held = sum(x.numel() * x.element_size() for xs in stored for x in xs)
        log.info(
            "MBQ gradients: the inputs of %d decoder layers take %.1f MiB on the host (%d bytes)", n, held / 2**20, held
        )

        grads: list[torch.Tensor | None] = []  # per chunk: dL/d(input of the layer just visited) [b, T, C]
        with layers.onload(n - 1, device) as layer, _head(model, family, device) as head:
            per_chunk = []
            for x, c, batch in zip(stored[n - 1], chunks, batches, strict=True):
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                x = x.to(device).detach().requires_grad_(True)
                per_chunk.append(_empty_sums(paths, 1))
                with torch.enable_grad(), _watch(layer, 0, paths, per_chunk[-1], c.roles):
                    loss = answer_loss(head(next_input(layer, x, c, n - 1), inputs), inputs["input_ids"], c.roles)
                    grads.append(None if loss is None else torch.autograd.grad(loss, x)[0].to(HOST))
            _add_in_chunk_order(sums, n - 1, per_chunk)
        stored[n - 1] = None
        bar.update()
        for li in reversed(range(n - 1)):
            with layers.onload(li, device) as layer:
                per_chunk = []
                for i, (x, c) in enumerate(zip(stored[li], chunks, strict=True)):
                    per_chunk.append(_empty_sums(paths, 1))
                    if grads[i] is None:
                        continue
                    x = x.to(device).detach().requires_grad_(True)
                    with torch.enable_grad(), _watch(layer, 0, paths, per_chunk[-1], c.roles):
                        out = next_input(layer, x, c, li)  # [b, T, C]
                        grads[i] = torch.autograd.grad(out, x, grads[i].to(device))[0].to(HOST)
                _add_in_chunk_order(sums, li, per_chunk)
            stored[li] = None
            bar.update()
    return sums


@torch.no_grad()
def _layer_inputs(layers: DecoderLayers, chunks: list[Chunk], device: torch.device, bar) -> list[list[torch.Tensor]]:
    """Per layer 0..L-1, per chunk, the layer's input x [b, T, C] on the host; the chunks keep none."""
    stored = [[c.x.to(HOST) for c in chunks]]
    for c in chunks:
        c.x = c.xq = None  # the inputs wait on the host
    for li in range(len(layers) - 1):
        with layers.onload(li, device) as layer:
            stored.append(
                [next_input(layer, x.to(device), c, li).to(HOST) for x, c in zip(stored[li], chunks, strict=True)]
            )
        bar.update()
    return stored


def sublayer_outputs(family: ModelFamily) -> list[str]:
    """The sub-layer output linears MBQ measures (``group.sublayer_output``: o_proj, down_proj), sorted."""
    paths = sorted({g.sublayer_output for g in family.groups if g.sublayer_output})
    if not paths:
        raise QigError(f"family {family.name} names no sub-layer outputs; MBQ cannot measure gradients")
    return paths


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy of the answer tokens (logits at p predict token p + 1); None without answer tokens.

    logits: [b, T, V]; input_ids, roles: [b, T].
    """
    target = roles[:, 1:] == ANSWER  # [b, T-1]
    if not target.any():
        return None
    return torch.nn.functional.cross_entropy(logits[:, :-1][target].float(), input_ids[:, 1:][target])


def _add_in_chunk_order(sums: GradientSums, layer_index: int, per_chunk: list[GradientSums]) -> None:
    """Add one layer's per-chunk sums into ``sums``, in global chunk order over every rank (``qig.dist``).

    A single process adds the chunks one after another into the same floats; so
    does this, whatever the number of ranks, so the sums are the same bits.
    """
    for part in ordered(per_chunk):
        for path, (s,) in part.items():
            total = sums[path][layer_index]
            for key, value in s.items():
                total[key] += value


def _empty_sums(paths: list[str], n_layers: int) -> GradientSums:
    return {p: [dict(vis=0.0, n_vis=0, ans=0.0, n_ans=0) for _ in range(n_layers)] for p in paths}


def _on_output(s: dict, roles: Callable[[], torch.Tensor]):
    """Forward hook of a sub-layer output linear: its output's gradient adds to ``s`` (roles: the batch's [b, T])."""

    def on_grad(g: torch.Tensor) -> None:
        per_token = g.detach().float().abs().mean(-1)  # [b, T]
        r = roles()
        vis, ans = r == VISION, r == ANSWER
        s["vis"] += float(per_token[vis].double().sum())
        s["n_vis"] += int(vis.sum())
        s["ans"] += float(per_token[ans].double().sum())
        s["n_ans"] += int(ans.sum())

    def hook(_module, _args, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(on_grad)

    return hook


@contextlib.contextmanager
def _watch(layer: torch.nn.Module, layer_index: int, paths: list[str], sums: GradientSums, roles: torch.Tensor):
    """While open, the gradients at ``layer``'s sub-layer outputs add to its sums (roles: the chunk's [b, T])."""
    handles = [
        get_module(layer, p).register_forward_hook(_on_output(sums[p][layer_index], lambda: roles)) for p in paths
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StandIn(torch.nn.Module):
    """A decoder layer in the head pass: passes the hidden states on, or, once ``top`` is set, returns it.

    as_tuple: returns ``(hidden_states,)``, for models whose layers return a tuple.
    """

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.top: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.top is None else self.top
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def _head(
    model: torch.nn.Module, family: ModelFamily, device: torch.device
) -> Iterator[Callable[[torch.Tensor, dict], torch.Tensor]]:
    """``head(h, inputs) -> logits [b, T, V]``: the model's forward with ``h`` as its top decoder layer's output.

    The model runs its own code after the layers (what it adds after the top
    layer, the final norm, lm_head, softcapping), with grad, on ``device``; the
    decoder layers are out of the module tree meanwhile (stand-ins).
    """
    modules = family.decoder_layers(model)
    originals = list(modules)
    top = _StandIn(family.layer_returns_tuple)

    def head(h: torch.Tensor, inputs: dict) -> torch.Tensor:
        top.top = h
        try:
            return model(**inputs, use_cache=False).logits
        finally:
            top.top = None

    home = None
    try:
        for i in range(len(modules)):
            modules[i] = top if i == len(modules) - 1 else _StandIn(family.layer_returns_tuple)
        home = next(model.parameters()).device
        model.to(device)  # everything but the decoder layers
        with frozen(model):
            yield head
    finally:
        if home is not None:
            model.to(home)
        for i, layer in enumerate(originals):
            modules[i] = layer
