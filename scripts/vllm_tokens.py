"""Greedy tokens of a model folder, by vLLM or by transformers, on image questions (scripts/check_vllm.sh --families).

The same prompts both ways: each question of a LLaVA-style QA file (``qig
world eval``) with its image, in the folder's own chat template, generation
prompt added; greedy, ``--max-tokens`` new tokens, no stop at EOS (so every
row has the same length; the tokens after an EOS are compared too).
``--engine vllm`` runs vLLM's offline ``LLM`` API (the check's venv,
``--dtype bfloat16``: vLLM's CPU WNA16 kernel has no float32 path) and also
records vLLM's scheme / kernel per linear (``vllm_answers.linear_kernels``);
``--engine transformers`` loads the folder with qig's loader (the project
venv, float32; activation quantizers of a W-A export come from
compressed-tensors) and runs ``generate``. Writes ``{"tokens": [[...], ...],
"first_margin": [...], ...}`` to ``--out``; a vLLM refusal is written as
``{"error": ...}`` with exit status 1.

    .venv-vllm/bin/python scripts/vllm_tokens.py --engine vllm --model out/f/fp/qwen2-vl --data w/data.json --out v.json
    .venv/bin/python scripts/vllm_tokens.py --engine transformers --model out/f/fp/qwen2-vl --data w/d.json --out h.json
"""

import argparse
import json
import os
import time
import traceback
from pathlib import Path


def prompts(model: str, data: str) -> list[tuple[str, object]]:
    """(chat-templated text, RGB image) per record of ``data``."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    path = Path(data)
    out = []
    for rec in json.loads(path.read_text()):
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append((text, Image.open(path.parent / rec["image"]).convert("RGB")))
    return out


def run_vllm(args, items) -> dict:
    from vllm import LLM, SamplingParams
    from vllm_answers import linear_kernels

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1, "video": 0},  # no video processor here (scripts/vllm_shim.py)
        enforce_eager=True,
        seed=0,
    )
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=2)
    batch = [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in items]
    outputs = llm.generate(batch, params, use_tqdm=False)
    t2 = time.perf_counter()
    first = []
    for o in outputs:
        top = sorted(o.outputs[0].logprobs[0].values(), key=lambda lp: -lp.logprob)
        first.append(top[0].logprob - top[1].logprob if len(top) > 1 else None)
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "first_margin": first,  # log-probability gap between the first token's top two candidates
        "layers": llm.apply_model(linear_kernels)[0],
        "seconds": {"load": t1 - t0, "generate": t2 - t1},
    }


def run_transformers(args, items) -> dict:
    import torch

    from qig.loading import load_model_and_processor

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(args.model, dtype=torch.float32)
    model.to(torch.float32)  # a float16/bfloat16 export's unquantized parts may load in their own dtype
    t1 = time.perf_counter()
    tokens, first, lengths = [], [], []
    with torch.no_grad():
        for text, image in items:
            inputs = processor(text=[text], images=[image], return_tensors="pt")
            inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
            out = model.generate(
                **inputs,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,  # no stop at EOS, as vLLM's ignore_eos
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            n = inputs["input_ids"].shape[1]
            tokens.append(out.sequences[0, n:].tolist())
            lengths.append(n)
            logp = out.scores[0][0].float().log_softmax(-1).topk(2).values  # scores: after min_new_tokens' mask
            first.append(float(logp[0] - logp[1]))
    t2 = time.perf_counter()
    from importlib.metadata import version

    return {
        "tokens": tokens,
        "prompt_tokens": lengths,
        "first_margin": first,
        "runtime": {p: version(p) for p in ("transformers", "compressed-tensors")},
        "seconds": {"load": t1 - t0, "generate": t2 - t1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "transformers"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="data.json of 'qig world eval' (images next to it)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's dtype (transformers runs float32)")
    args = parser.parse_args()
    items = prompts(args.model, args.data)
    try:
        result = run_vllm(args, items) if args.engine == "vllm" else run_transformers(args, items)
    except Exception as exc:  # any refusal is the answer here: it is written down, then we exit 1
        traceback.print_exc()
        Path(args.out).write_text(json.dumps({"model": args.model, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        raise SystemExit(1) from exc
    result = {"model": args.model, "engine": args.engine, **result}
    Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: apply_model sees the model here
    main()
