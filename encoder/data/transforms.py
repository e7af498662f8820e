"""Image transforms in PIL + numpy (no torchvision), deterministic given a numpy Generator.

train: random resized crop (scale 0.4-1, ratio 3/4-4/3; bilinear or bicubic, antialiased: PIL widens the filter
when it shrinks) -> with probability `jitter_p`, colour jitter in random order (brightness, contrast, saturation
factors from [1 - jitter, 1 + jitter]; hue shifted by up to +-`hue` of the colour circle when hue > 0) -> random
grayscale (p 0.2) -> uint8 [3, S, S]: the pretraining loader collates bytes (a quarter of float32's across the
worker boundary and the host-to-device copy) and the trainer normalises on the device (`normalize`, after the copy;
the same float32 operations as `to_tensor`, so the model sees the same numbers). eval: resize the short side, centre
crop, normalise: float32 [3, S, S].

The released OpenVision recipe is SimCLR's jitter with strength 0.4 (brightness / contrast / saturation 0.32,
hue 0.08) applied with p 0.8, grayscale p 0.2, bilinear resize (`encoder.config.RELEASED_DATA`, the paper
presets' default). The tiny presets keep a gentle jitter on every image and no hue (built-in scenes name colours).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image, converted by the image's real range: PIL's own convert("RGB") clips a 16-bit PNG (mode
    I;16 / I) at 255 (almost white) and a float TIFF (mode F) in [0, 1] to 0-1 of 255 (black). Integers are read
    as 0-65535 (outside it: from their own minimum to maximum); floats as [0, 1] when they lie there, else as
    0-255 when they lie there, else from their own minimum to maximum."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float64)
    finite = array[np.isfinite(array)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "F":
        top, low = (1.0, 0.0) if low >= 0 and high <= 1 else (255.0, 0.0) if low >= 0 and high <= 255 else \
            (high, low)
    else:
        top, low = (65535.0, 0.0) if low >= 0 and high <= 65535 else (high, low)
    scaled = np.nan_to_num((array - low) / max(top - low, 1e-12), nan=0.0, posinf=1.0, neginf=0.0)
    return Image.fromarray((np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "L").convert("RGB")


def to_uint8(image: Image.Image) -> torch.Tensor:
    """uint8 [3, S, S] of an image, as 8-bit RGB."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).transpose(2, 0, 1).copy())


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, MEAN and STD as float32 tensors on a device, made once (no host-to-device copy per batch). 255 is a
    tensor too: CUDA divides by a host scalar as a multiply by its reciprocal, which can differ in the last bit."""
    return (torch.tensor(255.0).to(device),
            *(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in (MEAN, STD)))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 ImageNet-normalised, on the pixels' device: (x / 255 - MEAN) / STD with each
    operation in float32, as `to_tensor` did in numpy before the loader collated bytes: the same numbers."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize takes uint8 pixels, got {pixels.dtype} (already normalised?)")
    scale, mean, std = _constants(pixels.device)
    return (pixels.to(torch.float32) / scale - mean) / std


def to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 [3, S, S], normalised."""
    return normalize(to_uint8(image))


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.4, 1.0),
                        ratio=(3 / 4, 4 / 3), resize: str = "bicubic") -> Image.Image:
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), RESAMPLE[resize], box=(left, top, left + w, top + h))
    return center_crop(image, size)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` (a fraction of the colour circle, in [-0.5, 0.5]), as torchvision does on PIL."""
    if shift == 0:
        return image  # the HSV round trip itself is lossy
    h, s, v = image.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8) + np.uint8(round(shift * 255) % 256)  # wraps around modulo 256
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float = 0.4, hue: float = 0.0) -> Image.Image:
    """Brightness, contrast, saturation (factors from [1 - strength, 1 + strength]) and, when hue > 0, a hue shift
    from [-hue, hue], in a random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in rng.permutation(4 if hue > 0 else 3):
        if op == 3:
            image = adjust_hue(image, rng.uniform(-hue, hue))
        else:
            image = enhancers[op](image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def train_transform(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.4, 1.0), jitter: float = 0.4,
                    grayscale_p: float = 0.2, hue: float = 0.0, jitter_p: float = 1.0,
                    resize: str = "bicubic") -> torch.Tensor:
    """uint8 [3, size, size]; `normalize` makes the model's input of it."""
    image = random_resized_crop(to_rgb(image), size, rng, scale, resize=resize)
    if jitter_p >= 1.0 or rng.random() < jitter_p:  # p 1 draws nothing: the tiny presets' stream stays as it was
        image = color_jitter(image, rng, jitter, hue)
    if rng.random() < grayscale_p:
        image = image.convert("L").convert("RGB")
    return to_uint8(image)


def eval_transform(size: int):
    """A callable PIL.Image -> [3, size, size] tensor (resize + centre crop + normalise)."""

    def transform(image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop(to_rgb(image), size))

    return transform
