"""Serve a model folder with vLLM's offline ``LLM`` API and answer a LLaVA-style QA file (scripts/check_vllm.sh).

Runs in the check's own venv (vLLM, no qig). Greedy, 6 new tokens, the
folder's own chat template, exactly what ``qig eval --data`` asks; writes
``{"answers": [...], "layers": {...}, "seconds": {...}}`` to ``--out``:
per linear layer of the served model (and its lm_head), vLLM's scheme and
kernel class (``UnquantizedLinearMethod`` for full-precision ones), so the
check can see what vLLM really built. When vLLM refuses the folder, ``--out``
gets ``{"error": "<the exception>"}`` and the exit status is 1.

    .venv-vllm/bin/python scripts/vllm_answers.py --model out/awq-w4-ct --data world/data.json --out answers.json
"""

import argparse
import json
import os
import time
from pathlib import Path

MAX_NEW_TOKENS = 6  # qig.evaluate.MAX_NEW_TOKENS


def linear_kernels(model) -> dict[str, str]:
    """Per vLLM linear layer and lm_head (vLLM's module name): ``scheme/kernel`` or the quant method's class."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase | ParallelLMHead):
            continue
        scheme = getattr(mod, "scheme", None)
        if scheme is None:
            out[name] = type(mod.quant_method).__name__
        else:
            kernel = getattr(scheme, "kernel", None)
            out[name] = type(scheme).__name__ + (f"/{type(kernel).__name__}" if kernel is not None else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="data.json of 'qig world eval' (images next to it)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    data_path = Path(args.data)
    records = json.loads(data_path.read_text())
    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    prompts = []
    for rec in records:
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        image = Image.open(data_path.parent / rec["image"]).convert("RGB")
        prompts.append({"prompt": text, "multi_modal_data": {"image": image}})

    t0 = time.perf_counter()
    try:
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            max_model_len=256,
            limit_mm_per_prompt={"image": 1},
            enforce_eager=True,
            seed=0,
        )
    except Exception as exc:  # any refusal is the answer here: it is written down, then we exit 1
        Path(args.out).write_text(json.dumps({"model": args.model, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        raise SystemExit(1) from exc
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    t2 = time.perf_counter()
    layers = llm.apply_model(linear_kernels)[0]
    result = {
        "model": args.model,
        "answers": [o.outputs[0].text.strip() for o in outputs],
        "layers": layers,
        "seconds": {"load": t1 - t0, "generate": t2 - t1},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: apply_model sees the model here
    main()
