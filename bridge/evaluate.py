"""Greedy answers from a LLaVA model + processor, and held-out accuracy on the built-in instruction set.

    answer(model, processor, images, questions) -> list[str]     batched, left-padded, greedy
    heldout_accuracy(model, processor, n=200, types=("colour", "shape")) -> {"accuracy", "by_type", "n", "chance"}
Works the same on our in-memory model and on a folder loaded with plain transformers.
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from bridge.data import HELDOUT_SEED, SynthInstructions
from encoder.data.synth import COLOURS, POSITIONS, SHAPES

CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "yesno": 1 / 2, "choice": 1 / 4,
          "position": 1 / len(POSITIONS)}


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@torch.no_grad()
def generate_ids(model, processor, images, questions: list[str], max_new_tokens: int = 16) -> list[list[int]]:
    """New token ids (greedy, eos excluded) for each (image, question)."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = tokenizer.eos_token_id
    result = []
    for row in new.tolist():
        result.append(row[: row.index(eos)] if eos in row else row)
    return result


def answer(model, processor, images, questions: list[str], max_new_tokens: int = 16) -> list[str]:
    ids = generate_ids(model, processor, images, questions, max_new_tokens)
    return [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


def heldout_accuracy(model, processor, n: int = 200, types: tuple[str, ...] = ("colour", "shape"),
                     seed: int = HELDOUT_SEED, batch_size: int = 16, image_size: int | None = None,
                     progress: bool = True) -> dict:
    """Exact-match accuracy (after lower-casing and dropping punctuation) on held-out scenes never trained on."""
    size = image_size or processor.image_processor.crop_size["height"]
    data = SynthInstructions(n, seed=seed, image_size=size, kinds=("shapes",), types=types)
    model.eval()
    rows = []
    for start in tqdm(range(0, n, batch_size), desc="held-out", leave=False, disable=not progress):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        preds = answer(model, processor, [it["image"] for it in items], [it["question"] for it in items],
                       max_new_tokens=8)
        rows += [(it["type"], normalise(p) == normalise(it["answer"]), p, it["answer"]) for it, p in zip(items, preds)]
    by_type = {t: sum(ok for tt, ok, *_ in rows if tt == t) / max(1, sum(tt == t for tt, *_ in rows)) for t in types}
    return {
        "accuracy": sum(ok for _, ok, *_ in rows) / len(rows),
        "by_type": by_type,
        "chance": {t: CHANCE.get(t) for t in types},
        "n": len(rows),
        "examples": [{"type": t, "pred": p, "answer": a} for t, _, p, a in rows[:8]],
    }


@torch.no_grad()
def caption_loss(model, collate, data, n: int = 64, batch_size: int = 8, progress: bool = True) -> dict:
    """How much the LLM's captions of unseen scenes depend on the image: the mean per-caption answer-token loss
    (nats per token) of `data`'s first `n` records (stage-1 caption pairs drawn from a seed no stage trains on) ->
    {"loss", "stderr" (over captions), "n"}. A bridge whose image tokens carry the scene scores well below a blind
    one; no benchmark is needed to tell (`ov2 run` puts it in results.csv beside the blind control's)."""
    from torch.nn.functional import cross_entropy

    from bridge.loss import answer_positions

    was_training = model.training
    model.eval()
    weight = next(model.parameters())
    per_caption = []
    for start in tqdm(range(0, n, batch_size), desc="caption loss", leave=False, disable=not progress):
        batch = collate([data[i] for i in range(start, min(n, start + batch_size))])
        batch = {k: v.to(weight.device, weight.dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        hidden, target, keep = answer_positions(model, batch)
        losses = cross_entropy(model.lm_head(hidden).float(), target, reduction="none")
        per_caption += [float(x.mean()) for x in losses.split(keep.sum(1).tolist()) if len(x)]
    model.train(was_training)
    mean = sum(per_caption) / len(per_caption)
    var = sum((x - mean) ** 2 for x in per_caption) / max(1, len(per_caption) - 1)
    return {"loss": mean, "stderr": (var / len(per_caption)) ** 0.5, "n": len(per_caption)}
