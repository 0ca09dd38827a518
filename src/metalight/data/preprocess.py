"""How a run turns an image into the tensor its model reads: one ImageFormat for the DataModule and for a trained learner.

The DataModule decodes its files with `images.decode_images` (resize, channels, Omniglot's inversion) into a
uint8 cache and normalizes each batch with `normalize`; a trained learner's own images (file paths, PIL
images or tensors) go through the same two functions with the run's settings, so a file gives the same
tensor both ways. Training images alone may also pass through `Augment` (data.train_augment), on the uint8
pixels, before `normalize`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor

from metalight.data.images import ImageRef, decode_images, to_chw
from metalight.errors import ConfigError, DataError

# a file (path or zip member), a PIL image, or a tensor as torchvision reads one: uint8 0..255 or float 0..1,
# [C, H, W] or [H, W], before any resizing, inversion or normalization
ImageInput = Union[str, Path, ImageRef, Image.Image, Tensor]


class InputFormat(Protocol):
    """What turns a learner's own inputs (image files, utterances) into the tensor its model reads: ImageFormat, or text's TextFormat."""

    def __call__(self, inputs: Sequence[Any]) -> Tensor:
        """The inputs as one batch [n, ...] for the model."""


AUGMENT_CODE = 4  # beside episodes.SPLIT_CODES (0-2) and flat.FLAT_CODE (3): the augmentation's own generators
_EXAMPLE = "e.g. {_target_: torchvision.transforms.v2.RandomHorizontalFlip}"


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


def _first_line(error: BaseException) -> str:
    """An exception's message on one line (its first)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def build_transforms(entries: object) -> list[Callable[[Tensor], Tensor]]:
    """data.train_augment's transforms: each entry a transform, or its Hydra config (`_target_` and arguments); ConfigError naming a bad one."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise ConfigError(f"data.train_augment={entries!r} is not a list: give a list of transforms ({_EXAMPLE}), or null for none.")
    transforms = []
    for i, entry in enumerate(entries):
        target = entry.get("_target_") if isinstance(entry, Mapping) else None
        if isinstance(entry, Mapping):
            try:
                entry = instantiate(entry)
            except InstantiationException as error:
                cause = error.__cause__ or error
                reason = f"{target} cannot be imported" if isinstance(cause, ImportError) else _first_line(cause)
                raise ConfigError(
                    f"data.train_augment[{i}] ({target}) cannot be built: {reason}. Give a transform's class and its "
                    f"arguments, {_EXAMPLE} (README: data.train_augment)."
                ) from None
        if not callable(entry):
            raise ConfigError(
                f"data.train_augment[{i}]={entry!r} is not a transform: give a `_target_` class and its arguments, {_EXAMPLE}."
            )
        transforms.append(entry)
    return transforms


class Augment:
    """Training-time augmentation (data.train_augment): transforms applied to each uint8 image [C, H, W] on its own.

    Image j's random draws come from torch's CPU generator seeded with (seed, AUGMENT_CODE, *keys[j]) inside
    `torch.random.fork_rng`: a function of the run's seed and the image's key alone (a flat sample number, or a
    training task's (epoch, index, position)), so any worker, rank or resumed run draws the same, and the
    caller's own random state is left as it was. The transforms see uint8 pixels, before `normalize`
    (torchvision.transforms.v2 takes uint8 tensors: ColorJitter and the others scale to 255 themselves).
    """

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]], seed: int) -> None:
        self.transforms, self.seed = list(transforms), seed

    def _seed(self, key: Sequence[int]) -> None:
        """Seed torch's CPU generator (only: a GPU's is never touched) for the image with this key."""
        state = np.random.SeedSequence([self.seed, AUGMENT_CODE, *(int(k) for k in key)]).generate_state(1, np.uint64)[0]
        torch.default_generator.manual_seed(int(state))

    def __call__(self, images: Tensor, keys: Sequence[Sequence[int]]) -> Tensor:
        """uint8 images [n, C, H, W] -> the same images augmented, image j with the draws of keys[j]."""
        out = torch.empty_like(images)
        with torch.random.fork_rng(devices=[]):
            for j, key in enumerate(keys):
                self._seed(key)
                image = images[j]
                for transform in self.transforms:
                    image = transform(image)
                out[j] = image
        return out

    def check(self, image: Tensor, dataset: str) -> None:
        """DataError naming data.train_augment[i] when transform i fails on a training image or does not keep it uint8 of its shape."""
        shape = list(image.shape)
        with torch.random.fork_rng(devices=[]):
            self._seed(())
            for i, transform in enumerate(self.transforms):
                try:
                    image = transform(image)
                except Exception as error:  # whatever the transform raises: name it and the images it got
                    raise DataError(
                        f"data.train_augment[{i}] ({type(transform).__name__}) fails on the uint8 {shape} training images of {dataset}: "
                        f"{_first_line(error)}. Fit its arguments to the images (data.image_size={shape[-1]})."
                    ) from None
                if not isinstance(image, Tensor) or list(image.shape) != shape or image.dtype != torch.uint8:
                    got = f"{image.dtype} {list(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
                    raise DataError(
                        f"data.train_augment[{i}] ({type(transform).__name__}) turns the uint8 {shape} training images of {dataset} into "
                        f"{got}: augmentation must keep their size and uint8 pixels (crop to data.image_size={shape[-1]}; "
                        "leave out ToDtype/Normalize: data.mean/std are applied after it)."
                    )
