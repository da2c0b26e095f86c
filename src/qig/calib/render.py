"""Rendering records with the model's processor and chat template; roles from the template's own prefix."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from qig.calib.data import ANSWER, DEFAULT_MAX_LENGTH, IMAGE_PLACEHOLDER, PROMPT, VISION, CalibrationSet, Sample
from qig.calib.records import ROLE_OF
from qig.errors import QigError

log = logging.getLogger(__name__)


def from_records(
    pairs: Sequence[tuple[object, dict]],
    processor,
    max_length: int = DEFAULT_MAX_LENGTH,
    image_seq_length: int | None = None,
    image_token_id: int | None = None,
) -> CalibrationSet:
    """Render (images, record) pairs; images: a PIL image, a list of them, or None (text).

    image_token_id: the token whose positions the model fills with image features
    (``qig.models.family_for(model).vision_token_id(model, processor)``); default:
    the processor's image token. They differ for Gemma 3, whose processor calls the
    begin-of-image marker its image token.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise QigError(f"max_length (the token cap per sample) must be a positive integer, got {max_length!r}")
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token_id is None:
        raise QigError("the tokenizer has no pad token; set one (e.g. the eos token) before calibrating")
    if image_token_id is None:
        image_token_id = _image_token_id(processor)
    samples = [
        _render(images, rec, i, processor, max_length, image_seq_length, image_token_id)
        for i, (images, rec) in enumerate(pairs)
    ]
    return CalibrationSet(samples, pad_token_id=tok.pad_token_id)


def _render(
    images, rec: dict, i: int, processor, max_length: int, image_seq_length: int | None, image_token_id: int | None
) -> Sample:
    sid = str(rec.get("id", i))
    tok = getattr(processor, "tokenizer", processor)
    if images is not None and not isinstance(images, list | tuple):
        images = [images]
    images = list(images) if images else None
    if "text" in rec and "conversations" not in rec and "messages" not in rec:
        try:
            enc = tok(rec["text"], return_tensors="pt")
        except (ValueError, TypeError) as exc:  # tokenizers raise TypeError for text they cannot encode
            raise QigError(f"sample {sid}: the tokenizer refused its text: {exc}") from exc
        enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        ids = enc["input_ids"][0]
        roles = torch.full_like(ids, ANSWER, dtype=torch.int8)
        return _truncate(Sample(sid, enc, roles), max_length, None, 0, 0)

    messages = chat_messages(rec, sid, len(images or []))
    full = _chat_text(processor, messages, sid)
    enc = _encode(processor, full, images, sid)
    ids = enc["input_ids"][0]
    roles = torch.full_like(ids, PROMPT, dtype=torch.int8)
    for start, end in _reply_spans(processor, messages, images, ids, sid):
        roles[start:end] = ANSWER
    n_images = len(images or [])
    if image_token_id is not None:
        roles[ids == image_token_id] = VISION
    sample = Sample(sid, enc, roles)
    return _truncate(sample, max_length, image_token_id, n_images, image_seq_length)


def chat_texts(processor, messages: list[dict]) -> tuple[str, str]:
    """The conversation rendered whole, and without its last reply but with the generation prompt.

    The second is the prompt the model answers from; its tokens are a prefix of
    the first's (``answer_span`` checks it), for any family's chat template.

    >>> full, prompt = chat_texts(processor, [user_turn, assistant_turn])  # doctest: +SKIP
    """
    full = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return full, prompt


def _chat_text(processor, messages: list[dict], sid: str, add_generation_prompt: bool = False) -> str:
    """The messages rendered by the chat template; a template that refuses them (``raise_exception``) is bad input."""
    from jinja2 import TemplateError

    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError) as exc:  # ValueError: transformers, e.g. no chat template at all
        raise QigError(f"sample {sid}: the chat template refused the conversation: {exc}") from exc


def _reply_spans(processor, messages: list[dict], images, ids: torch.Tensor, sid: str) -> list[tuple[int, int]]:
    """Positions ``[start, end)`` in ids [T] of every assistant reply after the first message, last reply first.

    Each reply is found as ``answer_span`` finds the last one: the conversation
    up to that reply, rendered with the generation prompt (and encoded with the
    images it holds), is a token prefix of ids. A reply ends at the first end
    token before the next reply starts; for a template that closes no turn with
    the end token, where the conversation rendered up to that reply ends. A
    reply that opens the conversation answers nothing and stays prompt.
    """
    eos = getattr(processor, "tokenizer", processor).eos_token_id
    replies = [k for k, m in enumerate(messages) if k > 0 and m["role"] == "assistant"]
    spans: list[tuple[int, int]] = []
    limit = ids.numel()  # the last reply may run to the end
    for k in reversed(replies):
        what = f"sample {sid}" if len(replies) == 1 else f"sample {sid} (the reply in message {k})"
        prompt = _chat_text(processor, messages[:k], sid, add_generation_prompt=True)
        prompt_ids = _encode(processor, prompt, _images_in(messages[:k], images), sid)["input_ids"][0]
        start, end = answer_span(ids[:limit], prompt_ids, eos, what)
        if spans and (eos is None or int(ids[end - 1]) != eos):  # no end token before the next reply
            upto = _chat_text(processor, messages[: k + 1], sid)
            upto_ids = _encode(processor, upto, _images_in(messages[: k + 1], images), sid)["input_ids"][0]
            if upto_ids.numel() > limit or not torch.equal(ids[: upto_ids.numel()], upto_ids):
                raise QigError(
                    f"{what}: the conversation rendered up to this reply is not a token prefix of the whole; "
                    "the chat template is not supported for answer detection"
                )
            end = max(upto_ids.numel(), start)
        spans.append((start, end))
        limit = start
    return spans


def _images_in(messages: list[dict], images):
    """The images of ``messages`` (the first n of the conversation's, n its image items); None: none."""
    n = sum(item["type"] == "image" for m in messages for item in m["content"])
    return list(images[:n]) if images and n else None


def answer_span(ids: torch.Tensor, prompt_ids: torch.Tensor, eos_token_id: int | None, what: str) -> tuple[int, int]:
    """Positions ``[start, end)`` of the last reply in ``ids``, its end token included.

    ids: [T] the whole conversation's tokens; prompt_ids: [T_p] those of its
    prompt (``chat_texts``), which must be a prefix of ids. The reply ends at the
    first ``eos_token_id`` after the prompt (or at the end of ids). ``what``
    names the conversation in the error ("sample x").

    >>> answer_span(torch.tensor([5, 6, 7, 2, 9]), torch.tensor([5, 6]), 2, "sample a")
    (2, 4)
    """
    start = prompt_ids.numel()
    if start > ids.numel() or not torch.equal(ids[:start], prompt_ids):
        raise QigError(
            f"{what}: the prompt rendered with add_generation_prompt is not a token prefix of the full "
            "conversation; the chat template is not supported for answer detection"
        )
    eos = (ids[start:] == eos_token_id).nonzero() if eos_token_id is not None else ids.new_zeros((0, 1))
    end = start + int(eos[0]) + 1 if eos.numel() else ids.numel()  # the answer includes its end token
    return start, end


def chat_messages(rec: dict, sid: str, n_images: int) -> list[dict]:
    """A LLaVA ``conversations`` or OpenAI-style ``messages`` record as chat-template messages.

    Content becomes a list of ``{"type": "text", "text": ...}`` and
    ``{"type": "image"}`` items: each ``<image>`` placeholder in a text is an
    image item, and so is each image item of a ``messages`` content list. With
    no placeholder at all, the images go before the first user text (the LLaVA
    convention). Each image needs exactly one image item.

    >>> chat_messages({"conversations": [{"from": "human", "value": "<image>\\nhi"},
    ...                                  {"from": "gpt", "value": "yes"}]}, "a", 1)[0]
    {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'hi'}]}
    """
    if "messages" in rec:
        turns = [(m["role"], m["content"]) for m in rec["messages"]]
    else:
        turns = [(ROLE_OF[t["from"]], t["value"]) for t in rec["conversations"]]
    messages = [{"role": role, "content": _content_items(content)} for role, content in turns]
    n_placeholders = sum(item["type"] == "image" for m in messages for item in m["content"])
    if n_placeholders == 0 and n_images:
        first = next((m for m in messages if m["role"] == "user"), messages[0])
        first["content"] = [{"type": "image"} for _ in range(n_images)] + first["content"]
        n_placeholders = n_images
    if n_placeholders != n_images:
        raise QigError(
            f"sample {sid}: {n_placeholders} image placeholder(s) ('{IMAGE_PLACEHOLDER}' in a text, or an "
            f"{{'type': 'image'}} item) but {n_images} image(s); each image needs exactly one placeholder"
        )
    return messages


def _content_items(content: str | list[dict]) -> list[dict]:
    """Text (or a list of content items) as items, each ``<image>`` in a text split out as an image item."""
    items: list[dict] = []
    for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        if item["type"] == "image":
            items.append({"type": "image"})
            continue
        for j, piece in enumerate(item["text"].split(IMAGE_PLACEHOLDER)):
            if j > 0:
                items.append({"type": "image"})
            if piece.strip():
                items.append({"type": "text", "text": piece.strip()})
    return items


def _encode(processor, text: str, images, sid: str) -> dict[str, torch.Tensor]:
    try:
        enc = processor(text=[text], images=images, return_tensors="pt") if images else processor(text=[text])
    except (ValueError, RuntimeError, TypeError) as exc:  # TypeError: tokenizers, for text they cannot encode
        raise QigError(f"sample {sid}: the processor refused it: {exc}") from exc
    out = {}
    for k, v in enc.items():
        out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return out


def _image_token_id(processor) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None:
        token = getattr(processor, "image_token", None)
        tok = getattr(processor, "tokenizer", None)
        if token is not None and tok is not None:
            tid = tok.convert_tokens_to_ids(token)
    return tid


def _truncate(
    sample: Sample, max_length: int, image_token_id: int | None, n_images: int, image_seq_length: int | None
) -> Sample:
    T = sample.roles.numel()
    if T > max_length and image_seq_length is None and (sample.roles[max_length:] == VISION).any():
        raise QigError(
            f"sample {sample.id}: the length cap {max_length} cuts through its image tokens (it has {T} tokens, "
            f"the last image token at position {int((sample.roles == VISION).nonzero().max())}); the model needs "
            "all of an image's tokens: raise the length cap (--max-length) or use smaller images"
        )
    if T > max_length:
        log.warning("sample %s has %d tokens; keeping the first %d (length cap)", sample.id, T, max_length)
        for k, v in list(sample.inputs.items()):
            if v.dim() == 2 and v.shape[1] == T:
                sample.inputs[k] = v[:, :max_length]
        sample.roles = sample.roles[:max_length]
    if image_token_id is not None and n_images:
        n_vision = int((sample.roles == VISION).sum())
        per_image = image_seq_length
        if per_image is not None and n_vision != n_images * per_image:
            raise QigError(
                f"sample {sample.id}: {n_vision} image tokens after rendering (cap {max_length}) but the model "
                f"expects {per_image} per image x {n_images} image(s); raise the length cap or fix the sample"
            )
        if per_image is None and n_vision == 0:
            raise QigError(f"sample {sample.id}: has {n_images} image(s) but no image tokens after rendering")
    if not (sample.roles == ANSWER).any():
        log.warning("sample %s has no answer tokens (truncated?)", sample.id)
    return sample


def check_n_samples(n_samples: int) -> None:
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples <= 0:
        raise QigError(f"n_samples must be a positive integer, got {n_samples!r}")
