"""Where each vision token sits in its image: the patch grid, per model family.

A grid mapping turns one rendered sample (processor outputs and token roles)
into the images the model saw, each with the sequence positions of its vision
tokens laid out on the patch grid ``[rows, cols]``. LLaVA's single-image grid
is built in; a family with tiling or dynamic resolution adds its own mapping
with :func:`register_grid`. Anything else is refused with the reason.

    >>> from qig.tokenmaps.grid import image_tokens
    >>> [t.grid for t in image_tokens(model.config, processor, sample.inputs, sample.roles)]  # doctest: +SKIP
    [PatchGrid(rows=6, cols=6, height=48, width=48)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qig.calib import VISION
from qig.errors import QigError


@dataclass(frozen=True)
class PatchGrid:
    """rows x cols patches covering an image of height x width pixels (as the model sees it)."""

    rows: int
    cols: int
    height: int
    width: int

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols


@dataclass
class ImageTokens:
    """One image as the model saw it ([H, W, 3] uint8) and its vision tokens' positions ([rows, cols])."""

    image: np.ndarray
    grid: PatchGrid
    positions: np.ndarray


# mapping(model config, processor, inputs with batch dim 1, roles [T]) -> the sample's images
GridMapping = Callable[[object, object, dict[str, torch.Tensor], torch.Tensor], list[ImageTokens]]
_MAPPINGS: dict[str, GridMapping] = {}


def register_grid(*model_types: str) -> Callable[[GridMapping], GridMapping]:
    """Decorator: ``@register_grid("my_family") def mapping(config, processor, inputs, roles): ...``."""

    def deco(fn: GridMapping) -> GridMapping:
        for t in model_types:
            _MAPPINGS[t] = fn
        return fn

    return deco


def image_tokens(config, processor, inputs: dict[str, torch.Tensor], roles: torch.Tensor) -> list[ImageTokens]:
    """The images of one sample with their vision tokens on the patch grid; [] for a text-only sample."""
    if not bool((roles == VISION).any()):
        return []
    model_type = getattr(config, "model_type", None)
    mapping = _MAPPINGS.get(model_type)
    if mapping is None:
        raise QigError(
            f"qig inspect cannot place the vision tokens of model type {model_type!r} on their image yet; "
            f"supported: {', '.join(sorted(_MAPPINGS))} (a family adds one with qig.tokenmaps.grid.register_grid)"
        )
    return mapping(config, processor, inputs, roles)


def processed_images(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """Undo the image processor's normalisation: [n, 3, H, W] -> [n, H, W, 3] uint8."""
    ip = getattr(processor, "image_processor", None)
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0], np.float32).reshape(1, 3, 1, 1)
    px = pixel_values.detach().float().cpu().numpy() * std + mean  # [n, 3, H, W] in [0, 1]
    return (np.clip(px, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


@register_grid("llava")
def llava_single_image(config, processor, inputs: dict[str, torch.Tensor], roles: torch.Tensor) -> list[ImageTokens]:
    """LLaVA: each image is resized to the tower's square input; one token per patch, row-major.

    A tower with a class token under ``vision_feature_select_strategy="full"``
    puts it first; it has no place on the grid and is left out.
    """
    vc = config.vision_config
    size, patch = int(vc.image_size), int(vc.patch_size)
    side = size // patch
    grid = PatchGrid(side, side, size, size)
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None or pixel_values.dim() != 4:
        shape = None if pixel_values is None else tuple(pixel_values.shape)
        raise QigError(f"expected LLaVA pixel_values [images, 3, H, W], got {shape}; tiled inputs are not supported")
    n_images = pixel_values.shape[0]
    if tuple(pixel_values.shape[2:]) != (size, size):
        raise QigError(
            f"images of {tuple(pixel_values.shape[2:])} pixels but the vision tower takes {size}x{size}; "
            "dynamic resolution is not supported by qig inspect yet"
        )
    positions = torch.nonzero(roles.flatten() == VISION).flatten().numpy()
    per_image, rest = divmod(positions.size, n_images)
    extra = per_image - grid.n_tokens
    if rest or extra not in (0, 1):
        raise QigError(
            f"a sample has {positions.size} vision tokens for {n_images} image(s), but the LLaVA grid is "
            f"{side}x{side} = {grid.n_tokens} per image; tiling (llava_next / anyres) is not supported by "
            "qig inspect yet, and a truncated sample (--max-length) loses vision tokens"
        )
    images = processed_images(pixel_values, processor)
    out = []
    for k in range(n_images):
        mine = positions[k * per_image + extra : (k + 1) * per_image]  # class token (if any) first
        out.append(ImageTokens(image=images[k], grid=grid, positions=mine.reshape(side, side)))
    return out
