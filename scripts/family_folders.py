"""Write a servable tiny random-weight model folder of every family vLLM implements (scripts/check_vllm.sh --families).

Runs in the project venv. Per family: ``build(name, size=SERVABLE)`` from
tests/models/_families.py (decoder hidden 256 with 4 heads of 64 and vision
heads of 64: vLLM's CPU attention refuses head_dim 16), its decoder redrawn
and its lm_head replaced by a decisive read-out (below), saved with ``qig.models.layout.save_model``
(save_pretrained, then the family's serving key layout) and its processor.

Decisive outputs. A random-weight model's state at the answer position is
mostly the same for every prompt (its own token dominates it): with the
builders' weights, in 6 of the 10 tiny families every one of 40 questions
gets the same first token, so "vLLM agrees with transformers" would say
little, and where the top logits of ~100 random rows lie close, bfloat16
(vLLM) against float32 (transformers) flips argmaxes that a trained model
would not. Nothing is trained; two documented, seed-fixed changes:

1. Larger init of the decoder: every decoder linear (the ones qig quantizes)
   is redrawn from N(0, 1/in_features) (``--decoder-gain`` 1; the builders use
   transformers' N(0, 0.02^2)), so attention and MLP outputs are as large as
   their inputs and the answer position's state depends on the question and
   the image (how much it varies between prompts, relative to its norm,
   grows 2-3x; bfloat16's rounding of it does not).
2. A read-out instead of a random lm_head, fitted on float32 forward passes of
   the model itself: final hidden states ``H`` (lm_head's input, [N, C]) at the
   answer position of ``--fit`` questions of the embedded world's *train*
   split (the check asks *eval* questions); ``H`` with its mean direction
   removed (then ``H`` has mean 0, and no bias is needed); its ``--rank``
   leading principal directions ``u_j`` with standard deviations ``s_j``;
   lm_head row of answer word ``2j`` = ``+gain * u_j / s_j``, of word ``2j + 1``
   = ``-gain * u_j / s_j``, every other row 0. The logits are ``gain`` times
   the standardised coordinates of the state along the directions in which
   prompts differ most: the first token depends on the image and the question
   (up to ``2 * rank`` different ones), and a top-two margin below bfloat16's
   rounding is rare (the check's families.json records transformers' margin
   wherever the engines differ).

The vision tower, the projector and the embeddings keep the builders' random
weights; lm_head stays full precision in every export (the families' ignore
lists). Tied embeddings (the tiny InternVL) are untied first: the input
embeddings keep their values.

    .venv/bin/python scripts/family_folders.py --out out/check-vllm-families/fp [--only qwen2-vl gemma3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
from _families import SERVABLE, TINY, build  # noqa: E402

from qig.embedded import world  # noqa: E402
from qig.models import family_for  # noqa: E402
from qig.models.layout import save_model  # noqa: E402

ANSWER_WORDS = ("red", "blue", "circle", "square", "yes", "no", "green", "triangle")  # world words, 2 per direction


def answer_states(model, processor, n: int, seed: int) -> torch.Tensor:
    """lm_head's input at the answer position of ``n`` world train questions, each with its image: [n, C]."""
    states = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: states.append(args[0][0, -1].float()))
    try:
        with torch.no_grad():
            for image, rec in world.generate("train", n, seed):
                question = rec["conversations"][0]["value"].replace("<image>", "").strip()
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
                model(**inputs)
    finally:
        hook.remove()
    return torch.stack(states)  # [n, C]


@torch.no_grad()
def redraw_decoder_(model, gain: float = 1.0, seed: int = 0) -> int:
    """Redraw every decoder linear's weight from N(0, gain^2 / in_features), seed-fixed; returns how many."""
    generator = torch.Generator().manual_seed(seed)
    linears = family_for(model).decoder_linears(model)
    for linear in linears.values():
        std = gain / linear.in_features**0.5
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
    return len(linears)


@torch.no_grad()
def decisive_head_(model, processor, fit: int = 64, rank: int = 3, gain: float = 8.0, seed: int = 0) -> dict:
    """Set ``model.lm_head`` to the read-out of the module docstring; returns what was fitted."""
    if rank > len(ANSWER_WORDS) // 2:
        raise ValueError(f"rank {rank} needs {2 * rank} answer words; there are {len(ANSWER_WORDS)}")
    embed = model.get_input_embeddings()
    if model.lm_head.weight.data_ptr() == embed.weight.data_ptr():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    h = answer_states(model, processor, fit, seed)  # [N, C]
    mean_dir = h.mean(0) / h.mean(0).norm()
    h = h - (h @ mean_dir)[:, None] * mean_dir  # mean 0 now: the read-out needs no bias
    _, s, v = torch.linalg.svd(h, full_matrices=False)  # v: [min(N, C), C], rows orthonormal and orthogonal to mean_dir
    std = s[:rank] / len(h) ** 0.5
    weight = torch.zeros_like(model.lm_head.weight, dtype=torch.float32)  # [V, C]
    ids = processor.tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS[: 2 * rank]))
    for j in range(rank):
        weight[ids[2 * j]] = gain * v[j] / std[j]
        weight[ids[2 * j + 1]] = -gain * v[j] / std[j]
    model.lm_head.weight.copy_(weight.to(model.lm_head.weight.dtype))
    explained = float((s[:rank] ** 2).sum() / (s**2).sum())
    return {"std": std.tolist(), "explained": explained, "tokens": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="one sub-folder per family is written here")
    parser.add_argument("--only", nargs="*", default=None, help=f"families (default: all of {', '.join(TINY)})")
    parser.add_argument("--fit", type=int, default=64, help="world train questions the read-out is fitted on")
    parser.add_argument("--rank", type=int, default=3, help="principal directions read out (2 tokens each)")
    parser.add_argument("--gain", type=float, default=8.0, help="logit of a state 1 standard deviation out")
    parser.add_argument("--decoder-gain", type=float, default=1.0, help="decoder linears drawn from N(0, gain^2/in)")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    args = parser.parse_args()
    for name in args.only or TINY:
        t = time.perf_counter()
        model, processor = build(name, seed=args.seed, size=SERVABLE)
        redraw_decoder_(model, args.decoder_gain, args.seed)
        fitted = decisive_head_(model, processor, args.fit, args.rank, args.gain)
        folder = Path(args.out) / name
        save_model(model, folder, family_for(model))
        processor.save_pretrained(folder)
        print(
            f"{name}: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; read-out of "
            f"{args.rank} directions holding {fitted['explained']:.0%} of the answer states' variance; "
            f"{time.perf_counter() - t:.1f}s)"
        )


if __name__ == "__main__":
    main()
