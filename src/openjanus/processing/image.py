"""Image loading, understanding-path preprocessing and generated-pixel conversion.

Preprocessing follows the official `VLMImageProcessor` exactly: long side resized to the
image size with PIL bicubic (what torchvision's functional resize does for PIL images),
short side truncated with `int`, padded to a centred square with (127, 127, 127), then
scaled to [0, 1] and normalised with mean = std = 0.5 to [-1, 1].
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

MIN_SIZE = 14  # the official processor's floor for the short side after resizing
BACKGROUND_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel, as the official processor computes it
RESCALE_FACTOR = 1.0 / 255.0
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def _open_and_convert(fp, name: str) -> Image.Image:
    # Treat Pillow's decompression-bomb *warning* as an error too: an image between
    # MAX_IMAGE_PIXELS and twice that would otherwise be decoded after a mere warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as image:
                _check_size(image, name)
                return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{name} is too large to decode safely: {error}") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name} is not a recognised image") from None
        except (OSError, SyntaxError, EOFError) as error:
            # Truncated or corrupt data surfaces only while decoding the pixels.
            raise ValueError(f"cannot decode {name}: {error}") from None


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} has zero size ({width}x{height})")


def load_image(source: ImageSource) -> Image.Image:
    """Load a path, encoded bytes, binary file object or PIL image as a new RGB PIL image.

    Like the official loader this is a plain `.convert("RGB")`: alpha is dropped (not
    composited) and EXIF orientation is not applied. Bad input raises `ValueError`: a missing
    file, data that is not an image, an image over Pillow's decompression-bomb limit
    (`Image.MAX_IMAGE_PIXELS`, checked from the header before any pixels are allocated), or
    an image with a zero-sized side.
    """
    if isinstance(source, Image.Image):
        _check_size(source, "image")
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_and_convert(io.BytesIO(bytes(source)), "image data")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        return _open_and_convert(path, f"image file {path}")
    if hasattr(source, "read"):
        return _open_and_convert(source, "image stream")
    raise TypeError(f"cannot load an image from {type(source).__name__}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    # Same float expression and `int` truncation as the official code (the transformers port
    # rounds instead, so it can differ by one pixel on the short side).
    long_side = max(width, height)
    min_size = min(MIN_SIZE, image_size)  # a floor above image_size could not fit the square
    new_width = max(int(width / long_side * image_size), min_size)
    new_height = max(int(height / long_side * image_size), min_size)
    return new_width, new_height


def preprocess_image(image: ImageSource, image_size: int) -> torch.Tensor:
    """Resize, pad and normalise one image to a float32 tensor (3, image_size, image_size) in [-1, 1]."""
    _check_image_size(image_size)
    image = load_image(image)  # validates and converts to RGB (a copy; the input is untouched)
    new_width, new_height = _resized_size(*image.size, image_size)
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUND_COLOR)
    canvas.paste(resized, ((image_size - new_width) // 2, (image_size - new_height) // 2))

    # The official processor rescales in float64, casts to float32, then normalises in float32.
    pixels = (np.asarray(canvas) * RESCALE_FACTOR).astype(np.float32)
    pixels = (pixels - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def preprocess_images(images: Sequence[ImageSource], image_size: int) -> torch.Tensor:
    """Preprocess a list of images into one float32 tensor (N, 3, image_size, image_size)."""
    _check_image_size(image_size)
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess_image(image, image_size) for image in images])


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Convert decoder output (B, 3, H, W) in about [-1, 1] to RGB PIL images.

    As in the official scripts: float32, `clip((x + 1) / 2 * 255, 0, 255)`, then truncation
    (not rounding) to uint8. NaNs become 0.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"expected a tensor of shape (B, 3, H, W), got {shape}")
    array = pixels.detach().to(device="cpu", dtype=torch.float32).numpy().transpose(0, 2, 3, 1)
    array = np.nan_to_num(np.clip((array + 1) / 2 * 255, 0, 255), nan=0.0)
    return [Image.fromarray(frame) for frame in array.astype(np.uint8)]
