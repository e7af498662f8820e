"""The resumable training loader.

The sample order is a pure function of (seed, position): epoch e visits `permutation(seed, e)` of the
source, and a checkpoint stores only the position (samples consumed). Augmentation draws from a numpy
Generator seeded by (seed, epoch, index), so worker count and restarts never change a batch.

A batch is {"pixels": uint8 [B, 3, S, S], "captions", "alts", "sentences": list[str], "seen": int, "bad": {reason:
count}} plus the token tensors the model takes: the collate tokenises them (models never see strings), as named by
the model class's `text_inputs(cfg)`, e.g. {"tokens": ("caption", 128)} for OpenVision 2 -> "tokens" [B, T].
Unusable samples are dropped from the batch and counted. Pixels stay bytes until the trainer has copied them to
its device, where `encoder.data.transforms.normalize` makes the model's float32 input.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from encoder.data.sources import BadSample
from encoder.data.transforms import train_transform
from encoder.tokenizer import get_tokenizer


class DataError(RuntimeError):
    """Too much of the data is unusable; the message says how much and where to look."""


class ResumableBatchSampler(Sampler):
    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n == 0:
            raise DataError("the data source is empty: no usable samples were found")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def keys(self, position: int, count: int) -> list[tuple[int, int]]:
        out = []
        while count:
            epoch, offset = divmod(position, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            take = min(count, self.n - offset)
            out += [(epoch, int(i)) for i in perm[offset: offset + take]]
            position, count = position + take, count - take
        return out

    def __iter__(self):
        position = self.start
        while True:
            yield self.keys(position, self.batch_size)
            position += self.batch_size

    def __len__(self) -> int:  # endless; the trainer counts steps
        return 2**62


def random_sentence(caption: str, rng: np.random.Generator) -> str:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?;])\s+", caption) if s.strip()]
    return sentences[int(rng.integers(len(sentences)))] if sentences else caption


class CaptionDataset(Dataset):
    def __init__(self, source, image_size: int, seed: int, crop_min_scale: float = 0.4, jitter: float = 0.4,
                 grayscale_p: float = 0.2, **augment):
        self.source, self.image_size, self.seed = source, image_size, seed
        # augment: hue, jitter_p, resize of `train_transform`
        self.augment = dict(scale=(crop_min_scale, 1.0), jitter=jitter, grayscale_p=grayscale_p, **augment)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            sample = self.source.read(index)
        except BadSample as err:
            return {"bad": str(err)}
        return self.prepare(sample, rng)

    def prepare(self, sample: dict, rng: np.random.Generator) -> dict:
        """A read sample -> the augmented item a batch is collated from."""
        pixels = train_transform(sample["image"], self.image_size, rng, **self.augment)
        return {"pixels": pixels, "caption": sample["caption"], "alt": sample["alt"],
                "sentence": random_sentence(sample["caption"], rng)}


class Collate:
    """Stacks pixels and tokenises texts: `texts` is {batch key: (sample field "caption" | "alt" | "sentence",
    token length)} (`encoder.models.text_inputs(cfg.model)`); an int n means {"tokens": ("caption", n)}."""

    def __init__(self, texts: int | dict[str, tuple[str, int]]):
        self.texts = {"tokens": ("caption", texts)} if isinstance(texts, int) else dict(texts)

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if "bad" not in it]
        bad = collections.Counter(it["bad"] for it in items if "bad" in it)
        batch = {"seen": len(items), "bad": dict(bad)}
        if good:
            tokenizer = get_tokenizer()
            batch.update(
                pixels=torch.stack([it["pixels"] for it in good]),
                captions=[it["caption"] for it in good],
                alts=[it["alt"] for it in good],
                sentences=[it["sentence"] for it in good],
            )
            for key, (field, length) in self.texts.items():
                batch[key] = tokenizer([it[field] for it in good], length)
        return batch


def make_loader(source, data_cfg, image_size: int, batch_size: int, seed: int, start: int | dict,
                texts: int | dict[str, tuple[str, int]]) -> DataLoader:
    """An endless loader from sample `start` on (a streamed shard source: from the cursors `start`,
    encoder.data.stream); `data_cfg` is the run's DataConfig (augmentation, workers); `texts` what the collate
    tokenises (see `Collate`)."""
    dataset = CaptionDataset(source, image_size, seed, data_cfg.crop_min_scale, data_cfg.color_jitter,
                             data_cfg.grayscale_p, hue=data_cfg.hue_jitter, jitter_p=data_cfg.color_jitter_p,
                             resize=data_cfg.resize)
    workers = data_cfg.workers
    if getattr(source, "streaming", False):
        from encoder.data.stream import stream_loader

        # decoded at twice the crop size at least: a random crop keeps down to 40 % of the side before its resize
        return stream_loader(source, dict(batch_size=batch_size, seed=seed, transform=dataset.prepare,
                                          collate=Collate(texts), decode_size=2 * image_size), workers, start or None)
    sampler = ResumableBatchSampler(len(source), batch_size, seed, start)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collate(texts), num_workers=workers,
        # a private generator: creating the iterator must not consume the global torch RNG (exact resume)
        generator=torch.Generator(), persistent_workers=False, prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU overlaps compute
    )
