"""Bridge training data: LLaVA conversation JSON, and built-in synthetic stage-1 / stage-2 sets.

A record is `{"id": str, "image": PIL.Image | path, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`
with `<image>` in the first human turn (LLaVA's format). `Collator` turns records into padded batches:
input_ids / attention_mask / labels [B,T] (labels -100 except answer tokens) and pixel_values [B,3,H,W].

Built-in sets are drawn from `encoder.data.synth.make_scene(seed, index)`: every record is a pure function of
(seed, index), so train and held-out splits come from disjoint seeds (TRAIN_SEED, HELDOUT_SEED).
    stage 1 (`SynthCaptions`): describe-the-image prompt -> the scene caption
    stage 2 (`SynthInstructions`): short answers, yes/no, multiple choice, counting, reading text, chart values
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bridge.processor import IGNORE, encode_conversation

TRAIN_SEED = 2024
HELDOUT_SEED = 977_000_013
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize the visual content of the image.",
)


class LlavaJsonDataset(Dataset):
    """LLaVA's `[{"id", "image", "conversations"}]` JSON; image paths are relative to `image_root`."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        path = Path(path)
        self.records = json.loads(path.read_text())
        if not isinstance(self.records, list):
            raise TypeError(f"{path}: expected a JSON list of conversations")
        self.image_root = Path(image_root) if image_root is not None else path.parent
        for r in self.records[:1]:
            if "conversations" not in r:
                raise ValueError(f"{path}: records need a 'conversations' list (LLaVA format)")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = r.get("image")
        if image is not None:
            image = Image.open(self.image_root / image).convert("RGB")
        return {"id": str(r.get("id", i)), "image": image, "conversations": r["conversations"]}


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


class SynthCaptions(Dataset):
    """Stage 1: caption pairs from synthetic scenes."""

    def __init__(self, n: int, seed: int = TRAIN_SEED, image_size: int = 64, kinds=("shapes", "text", "chart")):
        self.n, self.seed, self.image_size, self.kinds = n, seed, image_size, tuple(kinds)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from encoder.data.synth import make_scene

        scene = make_scene(self.seed, i, size=self.image_size, kinds=self.kinds)
        prompt = CAPTION_PROMPTS[np.random.default_rng([self.seed, i, 1]).integers(len(CAPTION_PROMPTS))]
        return {"id": f"cap-{self.seed}-{i}", "image": scene.image, "conversations": _turns(prompt, scene.caption)}


def _plural(shape: str) -> str:
    return shape + "s"


def shape_questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(type, question, answer) candidates about a shapes scene; only questions with one right answer."""
    from encoder.data.synth import COLOURS, SHAPES

    out = []
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    for o in objects:
        if shapes.count(o["shape"]) == 1:
            out.append(("colour", f"What colour is the {o['shape']}?{SHORT}", o["colour"]))
            options = [o["colour"]] + list(rng.choice([c for c in COLOURS if c != o["colour"]], 3, replace=False))
            rng.shuffle(options)
            letters = "ABCD"
            body = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options))
            out.append(("choice", f"What colour is the {o['shape']}?\n{body}{LETTER}",
                        letters[options.index(o["colour"])]))
        if colours.count(o["colour"]) == 1:
            out.append(("shape", f"What shape is the {o['colour']} object?{SHORT}", o["shape"]))
            out.append(("position", f"Where is the {o['colour']} {o['shape']}?{SHORT}", o["position"]))
        n = sum(p["count"] for p in objects if p["colour"] == o["colour"] and p["shape"] == o["shape"])
        out.append(("count", f"How many {o['colour']} {_plural(o['shape'])} are there?{SHORT}", str(n)))
    present = {(o["colour"], o["shape"]) for o in objects}
    o = objects[int(rng.integers(len(objects)))]
    out.append(("yesno", f"Is there a {o['colour']} {o['shape']} in the image?{SHORT}", "Yes"))
    for _ in range(10):
        c, s = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if (c, s) not in present:
            out.append(("yesno", f"Is there a {c} {s} in the image?{SHORT}", "No"))
            break
    return out


def scene_questions(scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    if scene.kind == "shapes":
        return shape_questions(scene.objects, rng)
    if scene.kind == "text":
        return [("text", f"What word is written in the image?{SHORT}", scene.meta["word"]),
                ("text_colour", f"What colour is the text?{SHORT}", scene.meta["colour"])]
    labels, values = scene.meta["labels"], scene.meta["values"]
    out = []
    for label, value in zip(labels, values):
        out.append(("chart", f"What is the value of bar {label}?{SHORT}", str(value)))
    if values.count(max(values)) == 1:
        out.append(("chart_max", f"Which bar is the tallest?{SHORT}", labels[values.index(max(values))]))
    return out


class SynthInstructions(Dataset):
    """Stage 2: one question per scene, types drawn uniformly among those the scene supports (or `types` only)."""

    def __init__(self, n: int, seed: int = TRAIN_SEED + 1, image_size: int = 64, kinds=("shapes", "text", "chart"),
                 types: tuple[str, ...] | None = None):
        self.n, self.seed, self.image_size, self.kinds = n, seed, image_size, tuple(kinds)
        self.types = tuple(types) if types else None

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> dict:
        from encoder.data.synth import make_scene

        for attempt in range(100):
            scene = make_scene(self.seed, i + attempt * 1_000_003, size=self.image_size, kinds=self.kinds)
            rng = np.random.default_rng([self.seed, i, 2, attempt])
            qs = [q for q in scene_questions(scene, rng) if self.types is None or q[0] in self.types]
            if qs:
                kinds = sorted({q[0] for q in qs})
                kind = kinds[int(rng.integers(len(kinds)))]
                qs = [q for q in qs if q[0] == kind]
                qtype, question, answer = qs[int(rng.integers(len(qs)))]
                return {"id": f"inst-{self.seed}-{i}", "image": scene.image, "type": qtype, "question": question,
                        "answer": answer, "conversations": _turns(question, answer)}
        raise RuntimeError(f"no question of types {self.types} in 100 scenes of kinds {self.kinds}")

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


class Collator:
    """Records -> padded batch (right padding; labels -100 on prompt, image and pad tokens)."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, max_len: int = 2048):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.max_len = num_image_tokens, max_len
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        enc = [encode_conversation(self.tokenizer, r["conversations"], self.num_image_tokens, self.max_len)
               for r in records]
        T = max(len(e["input_ids"]) for e in enc)
        B = len(enc)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(enc):
            n = len(e["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = e["input_ids"], e["labels"], 1
        images = [r["image"] for r in records]
        if any(im is None for im in images):
            raise ValueError("text-only records are not supported by the LLaVA-1.5 bridge: each record needs an image")
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}
