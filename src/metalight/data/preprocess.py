"""How a run turns an image into the tensor its model reads: one ImageFormat for the DataModule and for a trained learner.

The DataModule decodes its files with `images.decode_images` (resize, channels, Omniglot's inversion) into a
uint8 cache and normalizes each batch with `normalize`; a trained learner's own images (file paths, PIL
images or tensors) go through the same two functions with the run's settings, so a file gives the same
tensor both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalight.data.images import ImageRef, decode_images, to_chw

# a file (path or zip member), a PIL image, or a tensor as torchvision reads one: uint8 0..255 or float 0..1,
# [C, H, W] or [H, W], before any resizing, inversion or normalization
ImageInput = Union[str, Path, ImageRef, Image.Image, Tensor]


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The scale 1 / (255 std) and shift mean / std of `normalize`, computed once per statistics and device."""
    mean_t = torch.tensor(mean, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, device=device).view(-1, 1, 1)
    return 1.0 / (255.0 * std_t), mean_t / std_t


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images [..., C, H, W] -> float32 (x / 255 - mean) / std per channel, on their device."""
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).sub_(shift)


def _tensor_to_pil(image: Tensor) -> Image.Image:
    """A [C, H, W] or [H, W] tensor (uint8 0..255 or float 0..1) as a PIL image, pixels unchanged."""
    pixels = image.detach().cpu()
    if pixels.is_floating_point():
        pixels = pixels.clamp(0, 1).mul(255).round()
    array = pixels.to(torch.uint8).numpy()
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass(frozen=True)
class ImageFormat:
    """A run's image settings: size, channels, inversion (Omniglot: bright strokes) and per-channel mean/std."""

    image_size: int
    channels: int
    invert: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to: "L" for 1 channel, "RGB" for 3."""
        return "L" if self.channels == 1 else "RGB"

    def to_uint8(self, images: Sequence[ImageInput]) -> Tensor:
        """Images as the DataModule caches them: uint8 [n, C, size, size], files decoded by its own decoder.

        DataError naming the file when one cannot be read or is not an image.
        """
        out = np.empty((len(images), self.channels, self.image_size, self.image_size), np.uint8)
        files = [i for i, image in enumerate(images) if isinstance(image, (str, Path, ImageRef))]
        if files:
            refs = [images[i] if isinstance(images[i], ImageRef) else ImageRef(str(images[i])) for i in files]
            decoded = np.empty((len(files), *out.shape[1:]), np.uint8)
            decode_images(refs, decoded, self.mode, self.invert, progress=False)  # type: ignore[arg-type]
            out[files] = decoded
        for i, image in enumerate(images):
            if isinstance(image, Tensor):
                image = _tensor_to_pil(image)
            if isinstance(image, Image.Image):
                out[i] = to_chw(image, self.mode, self.image_size, self.invert)
            elif i not in files:
                raise TypeError(f"image {i} is a {type(image).__name__}: give file paths, PIL images or tensors")
        return torch.from_numpy(out)

    def __call__(self, images: Sequence[ImageInput]) -> Tensor:
        """Images as the model reads them: normalized float32 [n, C, size, size]."""
        return normalize(self.to_uint8(images), self.mean, self.std)
