"""Roles and the calibration set: samples with a role per token, batched with padding."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from qig.errors import QigError

log = logging.getLogger(__name__)

PAD, PROMPT, VISION, ANSWER = 0, 1, 2, 3
ROLE_NAMES = {PAD: "pad", PROMPT: "prompt", VISION: "vision", ANSWER: "answer"}
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_N_SAMPLES = 128
DEFAULT_MAX_LENGTH = 1024
_SEQUENCE_KEYS = ("input_ids", "attention_mask")  # padded with pad_token_id / 0


@dataclass
class Sample:
    """One rendered conversation: processor outputs with batch dim 1, and roles [T]."""

    id: str
    inputs: dict[str, torch.Tensor]
    roles: torch.Tensor  # [T] int8


@dataclass
class CalibBatch:
    """A right-padded batch: model inputs, roles [b, T] and sample ids."""

    inputs: dict[str, torch.Tensor]
    roles: torch.Tensor
    ids: list[str]


@dataclass
class CalibrationSet:
    """Rendered calibration samples, all padded (on the right) to one length ``seq_len``."""

    samples: list[Sample]
    pad_token_id: int
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise QigError("the calibration set is empty; give at least one sample")
        self.seq_len = max(s.roles.numel() for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def roles(self) -> torch.Tensor:
        """Roles of all samples, [N, T] int8 (pad = 0)."""
        return torch.stack([_pad_to(s.roles, self.seq_len, PAD) for s in self.samples])

    def n_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` makes."""
        return -(-len(self.samples) // batch_size)

    def batches(self, batch_size: int) -> Iterator[CalibBatch]:
        """Consecutive batches, each padded to ``seq_len`` so every batch has the same T."""
        if batch_size <= 0:
            raise QigError(f"batch size must be positive, got {batch_size}")
        for i in range(0, len(self.samples), batch_size):
            yield self._collate(self.samples[i : i + batch_size])

    def _collate(self, samples: Sequence[Sample]) -> CalibBatch:
        T = self.seq_len
        keys = set(samples[0].inputs)
        odd = [s.id for s in samples if set(s.inputs) != keys]
        if odd:
            # A text-only sample has no pixel_values; whether the batch dim of a family's image inputs counts
            # images (LLaVA) or samples (Idefics3) is not known here, so such a batch cannot be built safely.
            every = [set(s.inputs) for s in samples]
            differ = sorted(set.union(*every) - set.intersection(*every))
            raise QigError(
                f"samples {samples[0].id} and {odd[0]} share a batch but not their inputs ({', '.join(differ)}): "
                "text-only and image samples cannot be batched together; use batch size 1 (--batch-size 1) "
                "or a calibration file whose records all have images (or none)"
            )
        inputs: dict[str, torch.Tensor] = {}
        for key in samples[0].inputs:
            parts = [s.inputs[key] for s in samples]
            if key in _SEQUENCE_KEYS or (parts[0].dim() == 2 and parts[0].shape[1] == samples[0].roles.numel()):
                fill = self.pad_token_id if key == "input_ids" else 0
                inputs[key] = torch.stack([_pad_to(p[0], T, fill) for p in parts])  # [b, T]
            else:
                inputs[key] = _cat_padded(parts)  # images / patches of the batch, in order
        roles = torch.stack([_pad_to(s.roles, T, PAD) for s in samples])  # [b, T]
        return CalibBatch(inputs, roles, [s.id for s in samples])


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (tiles per sample differ).

    Zero padding is what the processors themselves do for a batch: LLaVA-NeXT /
    OneVision pad the tiles of each image, Idefics3 / SmolVLM the images of each
    sample (all-zero images are dropped by the model).
    """
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            q = p.new_zeros((p.shape[0], *shape))
            q[tuple(slice(0, n) for n in p.shape)] = p
            p = q
        padded.append(p)
    return torch.cat(padded, dim=0)


def _pad_to(x: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    # x: [T_i] -> [length], right padding
    return torch.cat([x, x.new_full((length - x.numel(),), fill)])
