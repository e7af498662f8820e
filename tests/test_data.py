"""Data: deterministic scenes, shard/folder readers, transforms, corrupt inputs skipped and counted."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoder.data.loader import CaptionDataset, Collate, ResumableBatchSampler
from encoder.data.shards import write_synth_shards
from encoder.data.sources import BadSample, FolderSource, SynthSource
from encoder.data.stream import StreamSource, shard_samples, shard_urls
from encoder.data.synth import COLOURS, SHAPES, make_scene
from encoder.data.transforms import eval_transform, train_transform
from encoder.tokenizer import BOS, EOS, PAD, get_tokenizer


def test_scenes_are_deterministic_and_captioned():
    a, b = make_scene(3, 17, 64), make_scene(3, 17, 64)
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_scene(4, 17, 64).caption != a.caption or make_scene(4, 18, 64).caption != a.caption
    kinds = {make_scene(0, i).kind for i in range(60)}
    assert kinds == {"shapes", "text", "chart"}
    scene = make_scene(0, 0, 64, kinds=("shapes",), max_groups=1)
    obj = scene.objects[0]
    assert obj["colour"] in COLOURS and obj["shape"] in SHAPES
    assert obj["colour"] in scene.caption and obj["shape"] in scene.caption and obj["colour"] in scene.alt
    # the drawn object has the caption's colour
    pixels = np.asarray(scene.image).reshape(-1, 3)
    assert (np.abs(pixels - np.asarray(COLOURS[obj["colour"]])).sum(1) < 10).sum() > 5


def test_transforms_shapes_and_determinism():
    image = make_scene(0, 1, 64).image
    x = train_transform(image, 32, np.random.default_rng(0))
    y = train_transform(image, 32, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and torch.equal(x, y)  # bytes: normalised on the device
    assert eval_transform(48)(image).shape == (3, 48, 48) and eval_transform(48)(image).dtype == torch.float32


def test_loader_collates_bytes_and_the_trainer_normalises_them_to_the_same_numbers():
    """The loader used to normalise in numpy in its workers and collate float32; the model must see exactly those
    numbers from the bytes it now collates, normalised after the copy to the device."""
    from dataclasses import replace

    from encoder.config import get_preset
    from encoder.data.loader import make_loader
    from encoder.data.sources import open_source
    from encoder.data.transforms import MEAN, STD, normalize
    from encoder.models import text_inputs
    from encoder.train import _model_inputs

    cfg = get_preset("ov2-micro")
    cfg = replace(cfg, data=replace(cfg.data, workers=0))
    size = cfg.stages[0].image_size
    batch = next(iter(make_loader(open_source(cfg.data, render_size=size), cfg.data, size, 6, cfg.seed, 0,
                                  text_inputs(cfg.model))))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (6, 3, size, size)
    assert len(torch.unique(batch["pixels"])) > 32  # real images, not a constant
    pixels = _model_inputs(batch, torch.device("cpu"))["pixels"]
    old = np.asarray(batch["pixels"], dtype=np.float32) / 255.0  # the float32 path the workers ran before
    old = (old - np.asarray(MEAN, dtype=np.float32)[:, None, None]) / np.asarray(STD, dtype=np.float32)[:, None, None]
    assert pixels.dtype == torch.float32 and torch.equal(pixels, torch.from_numpy(old))
    every = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)  # every byte value, every channel
    flat = np.asarray(every, dtype=np.float32) / 255.0
    flat = (flat - np.asarray(MEAN, dtype=np.float32)[:, None, None]) / np.asarray(STD, dtype=np.float32)[:, None, None]
    assert torch.equal(normalize(every), torch.from_numpy(flat))
    with pytest.raises(TypeError, match="uint8"):  # normalised twice would be silently wrong
        normalize(pixels)


def _png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_inputs_are_skipped_and_counted(tmp_path):
    good = tmp_path / "shard-000000.tar"
    with tarfile.open(good, "w") as tar:
        for i in range(6):
            _add(tar, f"s{i}.png", _png())
            _add(tar, f"s{i}.json", json.dumps({"caption": f"a red square number {i}.", "alt": "red"}).encode())
        _add(tar, "broken.png", b"\x89PNG\r\n\x1a\n not really a png")
        _add(tar, "broken.txt", b"a caption for a broken image")
        _add(tar, "silent.png", _png())
        _add(tar, "silent.txt", b"   ")
    (tmp_path / "shard-000001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    urls = shard_urls(str(tmp_path))
    assert urls == [str(good), str(tmp_path / "shard-000001.tar")]
    samples = list(shard_samples(urls[0]))
    assert [s["caption"] for s in samples[:6]] == [f"a red square number {i}." for i in range(6)]
    assert [str(s) for s in samples[6:]] == ["corrupt_image", "empty_caption"]
    assert [str(s) for s in shard_samples(urls[1])] == ["bad_shard"]  # unreadable: one mark, the stream goes on
    dataset = CaptionDataset(StreamSource(urls), 16, seed=0)
    batch = Collate(32)([dataset.prepare(s, np.random.default_rng(0)) if isinstance(s, dict) else {"bad": str(s)}
                         for s in samples])
    assert batch["seen"] == 8 and batch["pixels"].shape == (6, 3, 16, 16)
    assert batch["bad"] == {"corrupt_image": 1, "empty_caption": 1} and isinstance(samples[6], BadSample)


@pytest.mark.slow
def test_too_many_bad_samples_stop_with_a_clear_message(cli, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for i in range(80):
            _add(tar, f"s{i}.png", _png() if i % 3 else b"garbage")
            _add(tar, f"s{i}.txt", b"a red square")
    result = cli("train", "--preset", "ov2-micro", "--out", str(tmp_path / "run"), f"--data.source={shards}",
                 "--max_bad_fraction=0.1", "--stages.0.steps=20", "--stages.1.steps=1", timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "unusable" in result.stderr and "corrupt_image" in result.stderr and "max_bad_fraction=0.1" in result.stderr


def test_synth_shards_round_trip(tmp_path):
    paths = write_synth_shards(str(tmp_path), 25, seed=5, size=32, per_shard=10)
    assert len(paths) == 3
    assert shard_urls(f"{tmp_path}/shard-{{000000..000002}}.tar") == paths == shard_urls(f"{tmp_path}/shard-*.tar")
    sample = list(shard_samples(paths[0]))[3]
    assert sample["caption"] == make_scene(5, 3, 32).caption and sample["image"].size == (32, 32)
    assert sum(1 for p in paths for _ in shard_samples(p)) == 25
    halves = [StreamSource(paths).split(r, 2) for r in range(2)]
    assert halves[0].urls + halves[1].urls == [paths[0], paths[2], paths[1]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_image_folder_with_captions_file(tmp_path, fmt):
    rows = []
    for i in range(4):
        Image.new("RGB", (20, 20), (0, 0, 200)).save(tmp_path / f"img{i}.jpg")
        rows.append({"image": f"img{i}.jpg", "caption": f"a blue square {i}", "alt": "blue"})
    rows.append({"image": "missing.jpg", "caption": "gone", "alt": ""})
    path = tmp_path / f"captions.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    source = FolderSource(str(tmp_path), str(path))
    assert len(source) == 5 and source.read(2)["caption"] == "a blue square 2"
    batch = Collate(16)([CaptionDataset(source, 16, 0)[(0, i)] for i in range(5)])
    assert batch["pixels"].shape[0] == 4 and batch["bad"] == {"missing_image": 1}


def test_sampler_is_a_pure_function_of_position():
    sampler = ResumableBatchSampler(10, 4, seed=1)
    first = [b for _, b in zip(range(5), iter(sampler))]
    resumed = ResumableBatchSampler(10, 4, seed=1, start=8)
    assert next(iter(resumed)) == first[2]
    epoch0 = sorted(i for batch in first[:2] for _, i in batch) + sorted(i for _, i in first[2][:2])
    assert sorted(epoch0) == list(range(10))  # one epoch visits every sample once
    assert len(SynthSource(0, 100).split(1, 4)) == 25


def test_captions_decode_as_a_person_writes_them():
    from encoder.data import fashion_mnist as fm

    tok = get_tokenizer()
    captions = [make_scene(0, i, 64).caption for i in range(60)]
    captions += [text for label in range(10) for text in (*fm.describe(label, label), *fm.class_prompts(label))]
    assert {make_scene(0, i, 64).kind for i in range(60)} == {"shapes", "text", "chart"}
    for caption in captions:
        assert tok.decode(tok.encode(caption)) == caption.lower()
    for text in ('the word "zebra" written in red letters.', "values: a 5, b 3.", "it's a well-known x-ray (small) "
                 "of 3.5 cm/s, 1,000 times!", '"quoted" first; then "two" quotes?'):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a red circle")
    assert tok.decode([*ids, 7, 8]) == "a red circle"  # stops at eos
    assert tok.decode([BOS, PAD, *ids[1:-1], 30_600, PAD, EOS]) == "a red circle"  # pads and unused rows dropped
