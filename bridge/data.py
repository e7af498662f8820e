"""Bridge training data: LLaVA conversation JSON, and built-in synthetic stage-1 / stage-2 sets.

A record is `{"id": str, "image": PIL.Image | path, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`
with `<image>` in the first human turn (LLaVA's format). `Collator` turns records into padded batches:
input_ids / attention_mask / labels [B,T] (labels -100 except answer tokens) and pixel_values [B,3,H,W].

Built-in sets are drawn from `encoder.data.synth.make_scene(seed, index)`: every record is a pure function of
(seed, index), so train and held-out splits come from disjoint seeds (TRAIN_SEED, HELDOUT_SEED).
    stage 1 (`SynthCaptions`): describe-the-image prompt -> the scene caption
    stage 2 (`SynthInstructions`): short answers, yes/no, multiple choice, counting, reading text, chart values,
            in every answer format the built-in benchmark suite (benchmarks.evals.suite) asks for, with its prompt
            suffixes
The kind "fashion" (add it to `kinds`, e.g. `--synth_kinds=shapes,text,chart,fashion`) mixes in Fashion-MNIST
train images: captions from encoder.data.fashion_mnist, and "which item of clothing" questions.
Both skip every scene that `encoder.data.synth.is_heldout` marks (held-out (colour, shape), (word, colour) and
(bar colour, bar count) combinations): those scenes are reserved for the benchmark suite, so no suite image is ever
trained on. The prompt suffixes (SHORT, LETTER, YESNO) are the suite's own (benchmarks.evals.suite.prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from benchmarks.evals.suite.prompts import LETTER, SHORT, YESNO
from bridge.processor import IGNORE, IMAGE_TOKEN, encode_conversation
from encoder.data.loader import DataError
from encoder.data.synth import COLOURS, POSITIONS, SHAPES, Scene, an, is_heldout, make_scene, where

TRAIN_SEED = 2024
HELDOUT_SEED = 977_000_013
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize the visual content of the image.",
)


class LlavaJsonDataset(Dataset):
    """LLaVA's `[{"id", "image", "conversations"}]` JSON as LLaVA ships it (llava_v1_5_mix665k.json, the 558k
    caption set blip_laion_cc_sbu_558k.json): image paths relative to `image_root`; records without "image" are
    text-only (ShareGPT's in mix665k); a missing or unreadable image gives a record marked {"bad": reason}, which
    the collator skips and counts (a stage stops past `max_bad_fraction`)."""

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
        out = {"id": str(r.get("id", i)), "image": None, "conversations": r["conversations"]}
        if r.get("image") is not None:
            path = self.image_root / str(r["image"])
            try:
                with Image.open(path) as image:
                    out["image"] = image.convert("RGB")
            except FileNotFoundError:
                out["bad"] = "missing_image"
            except (OSError, ValueError, Image.DecompressionBombError):
                out["bad"] = "unreadable_image"
        return out


def fashion_scene(seed: int, index: int, size: int):
    """A Fashion-MNIST *train* image as a scene (kind "fashion", meta {"label"}); the suite uses the test split."""
    from encoder.data.fashion_mnist import describe, load_split, to_image

    images, labels = load_split("train")
    k = int(np.random.default_rng([seed, index, 4]).integers(len(labels)))
    caption, alt = describe(int(labels[k]), k)
    return Scene(to_image(images[k], size), caption, alt, "fashion", [], {"label": int(labels[k])})


def training_scene(seed: int, index: int, size: int, kinds) -> object:
    """The first scene at or after `index` (in steps of 1,000,003) that is not held out. The kind "fashion"
    (Fashion-MNIST train images) is drawn as often as each synthetic kind."""
    kinds = tuple(kinds)
    if "fashion" in kinds:
        synthetic = tuple(k for k in kinds if k != "fashion")
        if not synthetic or np.random.default_rng([seed, index, 3]).integers(len(kinds)) == 0:
            return fashion_scene(seed, index, size)
        kinds = synthetic
    for attempt in range(1000):
        scene = make_scene(seed, index + attempt * 1_000_003, size=size, kinds=kinds)
        if not is_heldout(scene):
            return scene
    raise RuntimeError(f"no training scene of kinds {kinds} near index {index}")


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


class SynthCaptions(Dataset):
    """Stage 1: caption pairs from synthetic scenes."""

    def __init__(self, n: int, seed: int = TRAIN_SEED, image_size: int = 64, kinds=("shapes", "text", "chart")):
        self.n, self.seed, self.image_size, self.kinds = n, seed, image_size, tuple(kinds)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        scene = training_scene(self.seed, i, self.image_size, self.kinds)
        prompt = CAPTION_PROMPTS[np.random.default_rng([self.seed, i, 1]).integers(len(CAPTION_PROMPTS))]
        return {"id": f"cap-{self.seed}-{i}", "image": scene.image, "conversations": _turns(prompt, scene.caption)}


def _plural(shape: str) -> str:
    return shape + "s"


def choice_question(question: str, answer: str, distractors: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """A lettered multiple-choice question (LLaVA's format) with the options shuffled -> (question, letter)."""
    options = [answer] + list(distractors)
    rng.shuffle(options)
    body = "\n".join(f"{letter}. {opt}" for letter, opt in zip("ABCDE", options))
    return f"{question}\n{body}{LETTER}", "ABCDE"[options.index(answer)]


def shape_questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(type, question, answer) candidates about a shapes scene; only questions with one right answer.

    Formats: short answers (colour, shape, position, count), yes/no (plain and MME's "Please answer yes or no."),
    lettered multiple choice over colours, shapes, positions and counts."""
    out = []
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    present = {(o["colour"], o["shape"]) for o in objects}

    def pick(pool, k, exclude):
        rest = [p for p in pool if p not in exclude]
        return [str(p) for p in rng.choice(rest, min(k, len(rest)), replace=False)]

    for o in objects:
        if shapes.count(o["shape"]) == 1:
            out.append(("colour", f"What colour is the {o['shape']}?{SHORT}", o["colour"]))
            q, a = choice_question(f"What colour is the {o['shape']}?", o["colour"], pick(COLOURS, 3, colours), rng)
            out.append(("choice", q, a))
            wrong = str(rng.choice([c for c in COLOURS if c != o["colour"]]))
            out.append(("yesno", f"Is the {o['shape']} {o['colour']}?{YESNO}{SHORT}", "Yes"))
            out.append(("yesno", f"Is the {o['shape']} {wrong}?{YESNO}{SHORT}", "No"))
        if colours.count(o["colour"]) == 1:
            out.append(("shape", f"What shape is the {o['colour']} object?{SHORT}", o["shape"]))
            out.append(("position", f"Where is the {o['colour']} {o['shape']}?{SHORT}", o["position"]))
            q, a = choice_question(f"What shape is the {o['colour']} object?", o["shape"], pick(SHAPES, 3, shapes), rng)
            out.append(("choice", q, a))
            taken = [p["position"] for p in objects]
            q, a = choice_question(f"Where is the {o['colour']} {o['shape']}?", o["position"],
                                   pick(POSITIONS, 3, taken), rng)
            out.append(("choice", q, a))
            wrong = str(rng.choice([p for p in POSITIONS if p not in taken]))
            out.append(("yesno", f"Is the {o['colour']} {o['shape']} {where(o['position'])}?{YESNO}{SHORT}", "Yes"))
            out.append(("yesno", f"Is the {o['colour']} {o['shape']} {where(wrong)}?{YESNO}{SHORT}", "No"))
        n = sum(p["count"] for p in objects if p["colour"] == o["colour"] and p["shape"] == o["shape"])
        things = f"{o['colour']} {_plural(o['shape'])}"
        out.append(("count", f"How many {things} are there?{SHORT}", str(n)))
        q, a = choice_question(f"How many {things} are there?", str(n), [str(k) for k in range(1, 6) if k != n][:3],
                               rng)
        out.append(("choice", q, a))
        wrong_n = int(rng.choice([k for k in (1, 2, 3, 4) if k != n]))
        verb = "Is there" if n == 1 else "Are there"
        out.append(("yesno", f"{verb} {n} {o['colour']} {o['shape'] if n == 1 else _plural(o['shape'])} in the image?"
                             f"{YESNO}{SHORT}", "Yes"))
        verb = "Is there" if wrong_n == 1 else "Are there"
        out.append(("yesno", f"{verb} {wrong_n} {o['colour']} {o['shape'] if wrong_n == 1 else _plural(o['shape'])} "
                             f"in the image?{YESNO}{SHORT}", "No"))
    o = objects[int(rng.integers(len(objects)))]
    out.append(("yesno", f"Is there {an(o['colour'])} {o['shape']} in the image?{SHORT}", "Yes"))
    out.append(("yesno", f"Is there {an(o['colour'])} {o['shape']} in this image?{YESNO}{SHORT}", "Yes"))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if c in colours or s in shapes]  # POPE's adversarial kind of negative
    for pool in (absent, near):
        c, s = pool[int(rng.integers(len(pool)))]
        out.append(("yesno", f"Is there {an(c)} {s} in the image?{SHORT}", "No"))
        out.append(("yesno", f"Is there {an(c)} {s} in this image?{YESNO}{SHORT}", "No"))
    return out


def chart_questions(labels: list[str], values: list[int], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    out = [("chart", f"What is the value of bar {label}?{SHORT}", str(value)) for label, value in zip(labels, values)]
    if values.count(max(values)) == 1:
        best = labels[values.index(max(values))]
        out.append(("chart_max", f"Which bar is the tallest?{SHORT}", best))
        q, a = choice_question("Context: a bar chart.\nWhich bar has the largest value?", best,
                               [lab for lab in labels if lab != best], rng)
        out.append(("choice", q, a))
        others = [str(x) for x in rng.choice([lab for lab in labels if lab != best], 2, replace=False)]
        q, a = choice_question("Context: a bar chart.\nWhich of these bars has the largest value?", best, others, rng)
        out.append(("choice", q, a))
    i, j = sorted(rng.choice(len(labels), 2, replace=False))
    if values[i] != values[j]:
        big = labels[i] if values[i] > values[j] else labels[j]
        out.append(("chart_max", f"Which bar is taller, {labels[i]} or {labels[j]}?{SHORT}", big))
        q, a = choice_question(f"Context: a bar chart.\nWhich bar has the larger value, {labels[i]} or {labels[j]}?",
                               big, [labels[j] if big == labels[i] else labels[i]], rng)
        out.append(("choice", q, a))
        out.append(("yesno", f"Is bar {labels[i]} taller than bar {labels[j]}?{YESNO}{SHORT}",
                    "Yes" if values[i] > values[j] else "No"))
    return out


def fashion_questions(label: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    from encoder.data.fashion_mnist import CLASSES

    others = [CLASSES[int(c)] for c in rng.choice([c for c in range(len(CLASSES)) if c != label], 3, replace=False)]
    q, a = choice_question("Which item of clothing is shown in the image?", CLASSES[label], others, rng)
    return [("fashion", f"What item of clothing is this?{SHORT}", CLASSES[label]), ("choice", q, a)]


def scene_questions(scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    if scene.kind == "shapes":
        return shape_questions(scene.objects, rng)
    if scene.kind == "fashion":
        return fashion_questions(scene.meta["label"], rng)
    if scene.kind == "text":
        return [("text", f"What word is written in the image?{SHORT}", scene.meta["word"]),
                ("text", f"What is written in the image?{SHORT}", scene.meta["word"]),
                ("text_colour", f"What colour is the text?{SHORT}", scene.meta["colour"])]
    return chart_questions(scene.meta["labels"], scene.meta["values"], rng)


def _one_of(questions: list[tuple[str, str, str]], kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    same = [q for q in questions if q[0] == kind]
    return same[int(rng.integers(len(same)))]


class SynthInstructions(Dataset):
    """Stage 2: up to `turns` questions about one scene as one conversation (the image in the first turn, as in
    LLaVA-1.5's multi-turn instruction data), each of another type where the scene allows; types drawn uniformly
    among those the scene supports (or `types` only)."""

    def __init__(self, n: int, seed: int = TRAIN_SEED + 1, image_size: int = 64, kinds=("shapes", "text", "chart"),
                 types: tuple[str, ...] | None = None, turns: int = 1):
        self.n, self.seed, self.image_size, self.kinds = n, seed, image_size, tuple(kinds)
        self.types = tuple(types) if types else None
        self.turns = turns

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> dict:
        for attempt in range(100):
            scene = training_scene(self.seed, i + attempt * 7_000_003, self.image_size, self.kinds)
            rng = np.random.default_rng([self.seed, i, 2, attempt])
            qs = [q for q in scene_questions(scene, rng) if self.types is None or q[0] in self.types]
            if qs:
                kinds = sorted({q[0] for q in qs})
                first = kinds[int(rng.integers(len(kinds)))]
                picked = [_one_of(qs, first, rng)]
                if self.turns > 1:
                    others = [k for k in kinds if k != first]
                    picked += [_one_of(qs, k, rng) for k in rng.permutation(others)[: self.turns - 1]]
                qtype, question, answer = picked[0]
                conversations = _turns(question, answer)
                for _, q, a in picked[1:]:
                    conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                return {"id": f"inst-{self.seed}-{i}", "image": scene.image, "type": qtype, "question": question,
                        "answer": answer, "conversations": conversations}
        raise RuntimeError(f"no question of types {self.types} in 100 scenes of kinds {self.kinds}")

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


class TaskMix(Dataset):
    """Stage 2 holding built-in tasks' train splits, as LLaVA-1.5's instruction mix holds the train splits of VQAv2,
    GQA, TextVQA and OCR-VQA: record i is, with probability `share`, one of the `per_task` train-split records of a
    task (`benchmarks.evals.suite.build.generate(name, split="train")`: the task's own questions, prompt suffix and
    answer balance; its test split stays unseen), else `base[i]`. Every record is a pure function of i."""

    def __init__(self, base: Dataset, tasks: tuple[str, ...], share: float, per_task: int = 256,
                 image_size: int = 64, seed: int = TRAIN_SEED + 2):
        self.base, self.tasks, self.share = base, tuple(tasks), share
        self.per_task, self.image_size, self.seed = per_task, image_size, seed
        self._pool: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def pool(self) -> list[dict]:
        if self._pool is None:
            from benchmarks.evals.suite.build import generate
            from benchmarks.evals.suite.tasks import get_task

            self._pool = []
            for name in self.tasks:
                suffix = get_task(name).suffix
                for r in generate(name, n=self.per_task, size=self.image_size, split="train"):
                    self._pool.append({"id": f"{name}-train-{r['id']}", "image": r["image"], "type": name,
                                       "question": r["question"] + suffix, "answer": r["answer"],
                                       "conversations": _turns(r["question"] + suffix, r["answer"])})
        return self._pool

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        if self.tasks and rng.random() < self.share:
            pool = self.pool()
            return pool[int(rng.integers(len(pool)))]
        return self.base[i]


def has_image_token(conversations: list[dict]) -> bool:
    return any(IMAGE_TOKEN in str(t.get("value", "")) for t in conversations)


def with_image_token(conversations: list[dict]) -> list[dict]:
    """An image record's turns with `<image>` in the first human turn (LLaVA puts it first where it is missing)."""
    if has_image_token(conversations):
        return conversations
    first = next((i for i, t in enumerate(conversations) if t.get("from", t.get("role")) in ("human", "user")), None)
    if first is None:
        return conversations
    turns = [dict(t) for t in conversations]
    turns[first]["value"] = IMAGE_TOKEN + "\n" + str(turns[first].get("value", ""))
    return turns


class Collator:
    """Records -> padded batch (right padding; labels -100 on prompt, image and pad tokens). Text-only records
    (image None) carry no `<image>`; pixel_values [N,3,H,W] holds the N images of the batch in order (None when it
    has none). Records marked {"bad": reason} are left out and counted: batch["skipped"] = {reason: count},
    batch["records"] = how many came in."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, max_len: int = 2048):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.max_len = num_image_tokens, max_len
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        skipped: dict[str, int] = {}
        good = []
        for r in records:
            reason = r.get("bad")
            if reason is None and r.get("image") is None and has_image_token(r["conversations"]):
                reason = "image_token_without_image"
            if reason is None:
                good.append(r)
            else:
                skipped[reason] = skipped.get(reason, 0) + 1
        if not good:
            raise DataError(f"a whole batch of {len(records)} records was unusable ({skipped}): check the data")
        records = good
        enc = [encode_conversation(self.tokenizer, with_image_token(r["conversations"]) if r.get("image") is not None
                                   else r["conversations"], self.num_image_tokens, self.max_len) for r in records]
        T = max(len(e["input_ids"]) for e in enc)
        B = len(enc)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(enc):
            n = len(e["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = e["input_ids"], e["labels"], 1
        images = [r["image"] for r in records if r.get("image") is not None]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values, "skipped": skipped, "records": len(records) + sum(skipped.values())}
