"""The layer-wise pipeline (METHOD.md section 3), written once for every method.

1. Capture the inputs of every decoder layer's first call (hidden states of
   layer 0, and each layer's keyword arguments: position embeddings, masks) by
   running the model with the layers swapped for catchers (``capture``).
2. Decoder layers in order, one at a time on the compute device, in ONE layer
   loop (``loop``). Per scale group: the group's input on the FP stream x (and
   on the quantized stream x^q when the method needs it; ``streams``,
   ``groups``), the method's token weights, the shared search, then the fold
   (a transform that keeps the FP function).
3. Push x through the FP (folded) layer, quantize the layer's linears with
   the shared quantizer, by RTN or by GPTQ (``config.gptq_settings``; its
   Hessians from x^q, see ``gptq``), keeping the quantizer's parameters
   (``QuantizationResult.quantized``), then push x^q through the quantized
   layer.

Applying saved scales (no calibration) and collecting token weights for
``qig inspect`` are modes of the same loop (``run``).

Weight-activation modes (``config.act_spec`` set) always carry x^q: the
finished layers run with quantized weights and per-token activation
quantizers on their linears (installed for good, see
``qig.quant.activation.install_activation_quantizers``), the finished groups
of the current layer likewise, and the search scores candidates on x^q
against f(x).

    >>> result = run_layerwise(model, AWQConfig(wbits=3), calib, device="cpu")  # doctest: +SKIP
"""

from qig.pipeline.capture import Chunk, capture, next_input
from qig.pipeline.gptq import gptq_layer_
from qig.pipeline.loop import frozen
from qig.pipeline.result import GroupRecord, InspectedGroup, QuantizationResult
from qig.pipeline.run import collect_token_weights, run_layerwise

__all__ = [
    "Chunk",
    "GroupRecord",
    "InspectedGroup",
    "QuantizationResult",
    "capture",
    "collect_token_weights",
    "frozen",
    "gptq_layer_",
    "next_input",
    "run_layerwise",
]
