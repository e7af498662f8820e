"""Fashion-MNIST (Debian package `dataset-fashion-mnist`): real images for pretraining and evaluation.

    images, labels = load_split("train")          # uint8 [60000, 28, 28], int64 [60000]
    source = FashionMNISTSource("train", size=64) # read(i) -> {"image": PIL RGB 64 x 64, "caption", "alt"}
    mixed = MixedSource(synth, source, 0.25)      # a quarter of the samples come from Fashion-MNIST

Captions and alt-texts are made from the label by varied templates (deterministic from the index); every
caption names the class with its canonical name (`CLASSES`), and `class_prompts(label)` gives the prompts
the zero-shot evaluation ranks. Pretraining reads the train split only; the test split is for evaluation.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np
from PIL import Image

ROOT = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
SYNONYMS = (
    ("t-shirt", "tee", "short sleeve top"), ("trousers", "pants", "slacks"), ("pullover", "sweater", "jumper"),
    ("dress", "summer dress", "gown"), ("coat", "jacket", "winter coat"), ("sandal", "summer shoe", "flip flop"),
    ("shirt", "button shirt", "blouse"), ("sneaker", "trainer", "running shoe"), ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
KIND = ("top", "bottom", "top", "dress", "top", "shoe", "top", "shoe", "accessory", "shoe")
KIND_WORDS = {"top": "a piece of clothing for the upper body", "bottom": "a piece of clothing for the legs",
              "dress": "a piece of clothing", "shoe": "a piece of footwear", "accessory": "a fashion accessory"}
CAPTIONS = (
    "a grayscale photo of {a_name} on a black background. the {name} is centred and fills most of the picture.",
    "a small black and white product image of {a_name}. it shows {kind}.",
    "{a_name} in shades of gray against a plain black background.",
    "a low resolution picture of {a_name}. the image is a catalogue photo of {kind}.",
    "a photo of {a_name}. a single item seen from the front on black.",
)
ALTS = ("{syn}", "{syn} product photo", "fashion item: {syn}", "{syn} grayscale", "buy {syn} online")
PROMPTS = ("a photo of {a_name}.", "a grayscale photo of {a_name} on a black background.", "{a_name}.")
SEED = 7919  # template draws; independent of the training seed so captions are fixed per image


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def class_prompts(label: int) -> list[str]:
    return [t.format(a_name=_a(CLASSES[label])) for t in PROMPTS]


def describe(label: int, index: int) -> tuple[str, str]:
    """(caption, alt) for image `index` of class `label`."""
    rng = np.random.default_rng([SEED, index])
    name = CLASSES[label]
    caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(a_name=_a(name), name=name,
                                                                 kind=KIND_WORDS[KIND[label]])
    alt = ALTS[int(rng.integers(len(ALTS)))].format(syn=SYNONYMS[label][int(rng.integers(3))])
    return caption, alt


def available(root: str = ROOT) -> bool:
    return all(os.path.exists(os.path.join(root, f)) for pair in FILES.values() for f in pair)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_split(split: str, root: str = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of "train" (60,000) or "test" (10,000)."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    if not available(root):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: install the Debian package dataset-fashion-mnist "
                                "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR")
    images, labels = (_read_idx(os.path.join(root, name)) for name in FILES[split])
    return images, labels.astype(np.int64)


def to_image(array: np.ndarray, size: int | None = None) -> Image.Image:
    """A 28 x 28 uint8 array -> PIL RGB, resized (bicubic) to size x size when given."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))  # 2-D uint8 -> mode "L"
    if size and size != image.size[0]:
        image = image.resize((size, size), Image.BICUBIC)
    return image.convert("RGB")


class FashionMNISTSource:
    """A sample source (see encoder/data/sources.py) over one split, with template captions."""

    def __init__(self, split: str = "train", size: int = 64, indices: range | None = None, root: str = ROOT):
        self.split_name, self.size, self.root = split, size, root
        self.images, self.labels = load_split(split, root)
        self.indices = indices if indices is not None else range(len(self.labels))

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> dict:
        index = self.indices[i]
        caption, alt = describe(int(self.labels[index]), index)
        return {"image": to_image(self.images[index], self.size), "caption": caption, "alt": alt}

    def split(self, rank: int, world: int) -> FashionMNISTSource:
        return FashionMNISTSource(self.split_name, self.size, self.indices[rank::world], self.root)


class MixedSource:
    """`base` followed by enough samples of `extra` to make `fraction` of the whole (extra repeats if short).

    The loader permutes positions, so batches hold the fraction on average. `split` splits both parts.
    """

    def __init__(self, base, extra, fraction: float):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"mix fraction must be in (0, 1), got {fraction}")
        self.base, self.extra, self.fraction = base, extra, fraction
        self.n_extra = max(1, round(len(base) * fraction / (1.0 - fraction))) if len(extra) else 0

    def __len__(self) -> int:
        return len(self.base) + self.n_extra

    def read(self, i: int) -> dict:
        if i < len(self.base):
            return self.base.read(i)
        return self.extra.read((i - len(self.base)) % len(self.extra))

    def split(self, rank: int, world: int) -> MixedSource:
        return MixedSource(self.base.split(rank, world), self.extra.split(rank, world), self.fraction)
