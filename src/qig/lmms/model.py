"""``--model qig`` for lmms-eval: any qig folder, loaded by qig's loader, answering greedily as ``qig eval`` does.

    lmms-eval --model qig --model_args pretrained=out/rtn-w4a4,device=cuda --tasks vizwiz_vqa_val

Model args (``--model_args k=v,...``): ``pretrained`` (a model folder or hub id, with ``revision``; default
the embedded model), ``device`` (cpu, cuda, cuda:N), ``batch_size``, ``dtype``
(float32, as ``qig eval`` loads; bfloat16, float16, or auto: the checkpoint's),
``trust_remote_code``, ``max_new_tokens`` (for tasks that set none) and
``model_offload`` (none, the default here; disk: the decoder layers read from
disk as the model calls them; auto: ``qig eval --model-offload``'s rule).

The folder is loaded by ``qig.evaluate.load_for_eval``: a
weight-activation folder gets its per-token activation quantizers back, which
lmms-eval's own ``llava_hf`` model, loading with plain transformers, leaves out
(it scores the float answers). A question with one image is rendered and
batched by ``qig.evaluate``'s own ``_prompt`` and ``_batch``, in lmms-eval's
request order, so on the same questions and batch size the answers are
``qig eval``'s, token for token. Questions with no image or several images
(ScienceQA's text-only ones, MMMU's multi-image ones) are answered one at a
time, with one image entry per image in the chat message.

Generation is greedy; the task's ``max_new_tokens`` and ``until`` stop strings
are honoured, a request for sampling or beams is logged and answered greedily.
Only ``generate_until`` is implemented: loglikelihood (multiple-choice by
likelihood) and multi-round tasks are refused with a one-line error.
"""

from __future__ import annotations

import logging
import os
from itertools import groupby
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm import tqdm

from qig.errors import QigError
from qig.evaluate import _batch, _prompt, load_for_eval
from qig.loading import activation_note

try:
    from lmms_eval.api.model import lmms
except ImportError:  # lmms-eval not installed: the module still imports (doctests); nothing can run it then
    lmms = object
if TYPE_CHECKING:
    from lmms_eval.api.instance import Instance

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class QigModel(lmms):
    """lmms-eval's model API (``generate_until``) over a qig model folder; see the module doc."""

    is_simple = True  # lmms-eval's "simple" model type: a prompt string and doc_to_visual per request

    def __init__(
        self,
        pretrained: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 64,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        max_new_tokens: int = 1024,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; batches here have a fixed size
        revision: str | None = None,
        model_offload: str = "none",
        **unknown,
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise QigError("the qig model runs in one process; launch lmms-eval without accelerate/torchrun workers")
        if unknown:
            allowed = (
                "pretrained (a folder or hub id), revision, device, batch_size, dtype, trust_remote_code, "
                "max_new_tokens, model_offload"
            )
            raise QigError(f"the qig model takes no {', '.join(sorted(unknown))}; its model args are: {allowed}")
        if dtype not in DTYPES:
            raise QigError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise QigError(f"batch_size {batch_size!r} is not supported; use an integer >= 1")
        self.max_new_tokens = int(max_new_tokens)
        from qig.api import check_device

        check_device(device)
        self._device = torch.device(device)
        self._model, self.processor = load_for_eval(
            pretrained, device, model_offload, revision, DTYPES[dtype], bool(trust_remote_code)
        )
        self.processor.tokenizer.padding_side = "left"  # batched generation, as qig.evaluate.generate_answers pads
        self.pretrained = str(pretrained) if pretrained is not None else "embedded"
        self.activations = activation_note(self._model)
        log.info("qig model %s%s", self.pretrained, f" ({self.activations})" if self.activations else "")
        self._warned: set[str] = set()

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in the requests' order; same-settings one-image runs are batched as ``qig eval`` does.

        Requests are read batch_size at a time (their images too, so memory
        stays bounded); within such a window, consecutive one-image requests
        with the same settings form one batch, the others go one by one.
        """
        answers: list[str] = []
        bar = tqdm(total=len(requests), desc="qig answering", disable=not requests)
        for start in range(0, len(requests), self.batch_size):
            items = [self._item(req) for req in requests[start : start + self.batch_size]]
            for (settings, single), run in groupby(items, key=lambda it: (it[2], len(it[1]) == 1)):
                run = list(run)
                for chunk in [run] if single else [[item] for item in run]:
                    answers += self._answer(chunk, single, *settings)
                    bar.update(len(chunk))
        bar.close()
        return answers

    def _item(self, req: Instance) -> tuple[str, list[Image.Image], tuple[int, tuple[str, ...]]]:
        """(question, images, (max_new_tokens, stop strings)) of one generate_until request."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = [v for v in _flat(visuals) if v is not None]
        if any(not isinstance(v, Image.Image) for v in images):
            kinds = sorted({type(v).__name__ for v in images if not isinstance(v, Image.Image)})
            raise QigError(f"task {task}: the qig model answers about images only, got {', '.join(kinds)} visuals")
        images = [v if v.mode == "RGB" else v.convert("RGB") for v in images]  # as qig.evaluate.load_records reads
        gen_kwargs = dict(gen_kwargs or {})
        asks = {
            "temperature": (gen_kwargs.get("temperature") or 0) > 0,
            "do_sample": gen_kwargs.get("do_sample") is True,
            "num_beams": (gen_kwargs.get("num_beams") or 1) > 1,
        }
        for key in [k for k, asked in asks.items() if asked and k not in self._warned]:
            self._warned.add(key)
            log.warning("task %s asks for %s=%r; the qig model generates greedily", task, key, gen_kwargs[key])
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        # the question as qig.evaluate._question reads a record: image placeholders out, images go in the message
        question = context.replace("<image>", "").strip()
        return question, images, (int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), until)

    @torch.no_grad()
    def _answer(self, chunk, single: bool, max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        if single:  # one image each: qig eval's prompt and batch
            texts = [_prompt(self.processor, question) for question, _, _ in chunk]
            enc = _batch(self.processor, texts, [(images[0], None) for _, images, _ in chunk], self._model)
        else:
            enc = self._single(*chunk[0][:2])
        out = self._model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        return [_cut(s, until).strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _single(self, question: str, images: list[Image.Image]):
        """Inputs for a question with no image or several: one image entry per image, then the text."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.processor(text=[text], images=[images] if images else None, return_tensors="pt")
        enc = enc.to(self._device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(next(self._model.parameters()).dtype)
        return enc

    def loglikelihood(self, requests):
        raise QigError(
            "the qig model answers generate_until tasks only; this task scores by loglikelihood "
            "(multiple choice by likelihood): pick the task's generate_until variant"
        )

    def generate_until_multi_round(self, requests):
        raise QigError("the qig model answers single-round generate_until tasks only; this task is multi-round")


def _flat(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, list | tuple):
        return [v for item in visuals for v in _flat(item)]
    return [visuals]


def _cut(text: str, until: tuple[str, ...]) -> str:
    """The text up to the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
