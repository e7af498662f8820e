"""Image transforms in PIL + numpy (no torchvision), deterministic given a numpy Generator.

train: random resized crop (scale 0.4-1, ratio 3/4-4/3) -> colour jitter (brightness, contrast, saturation
0.4) -> random grayscale (p 0.2) -> tensor -> ImageNet normalisation. eval: resize the short side, centre
crop, normalise. Output: float32 [3, S, S].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.4, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return center_crop(image, size)


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float = 0.4) -> Image.Image:
    for enhance in rng.permutation(3):
        factor = rng.uniform(1 - strength, 1 + strength)
        image = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[enhance](image).enhance(factor)
    return image


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def train_transform(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.4, 1.0), jitter: float = 0.4,
                    grayscale_p: float = 0.2) -> torch.Tensor:
    image = random_resized_crop(image.convert("RGB"), size, rng, scale)
    image = color_jitter(image, rng, jitter)
    if rng.random() < grayscale_p:
        image = image.convert("L").convert("RGB")
    return to_tensor(image)


def eval_transform(size: int):
    """A callable PIL.Image -> [3, size, size] tensor (resize + centre crop + normalise)."""

    def transform(image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop(image.convert("RGB"), size))

    return transform
