"""Generators over shape scenes (two or three groups; heldout=True: at least one a held-out (colour, shape) pair,
heldout=False: only pairs that training scenes hold): GQA-like short answers, POPE-like existence, MME-like yes/no
pairs, SEED-like lettered choice.

Each `make_<task>(n, seed, size, heldout, split) -> list[record]` is a pure function of its arguments (the split is
the seed's: benchmarks.evals.suite.build). The question templates
are those the bridge's stage-2 mix teaches (bridge.data), so the suite tests the images, not the wording.
The templates are written here, not imported from the bridge: the benchmark does not depend on the bridge's
training data (only on encoder.data.synth's scenes and the suite's own prompt suffixes).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from benchmarks.evals.suite.common import balanced, interleave, lettered, quotas, scenes
from benchmarks.evals.suite.prompts import YESNO
from encoder.data.synth import COLOURS, POSITIONS, SHAPES, an, where

MIN_GROUPS = 2


def _things(colour: str, shape: str, n: int) -> str:
    return f"{n} {colour} {shape if n == 1 else shape + 's'}"


def _count(objects: list[dict], o: dict) -> int:
    return sum(p["count"] for p in objects if p["colour"] == o["colour"] and p["shape"] == o["shape"])


def _unique(objects: list[dict], field: str) -> list[dict]:
    values = [o[field] for o in objects]
    return [o for o in objects if values.count(o[field]) == 1]


def _record(index: int, scene, question: str, answer: str, qtype: str, **extra) -> dict:
    return {"id": 0, "image_id": index, "image": scene.image, "question": question, "answer": answer, "type": qtype,
            **extra}


def make_gqa(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """What colour is the <shape>? / What shape is the <colour> object? / Where is the <colour> <shape>?"""
    def candidates():
        for index, scene in scenes(seed, "shapes", size, MIN_GROUPS, heldout):
            rng = np.random.default_rng([seed, index])
            qtype = ("colour", "shape", "position")[index % 3]
            pool = _unique(scene.objects, "shape" if qtype == "colour" else "colour")
            if not pool:
                continue
            o = pool[int(rng.integers(len(pool)))]
            if qtype == "colour":
                yield _record(index, scene, f"What colour is the {o['shape']}?", o["colour"], qtype)
            elif qtype == "shape":
                yield _record(index, scene, f"What shape is the {o['colour']} object?", o["shape"], qtype)
            else:
                yield _record(index, scene, f"Where is the {o['colour']} {o['shape']}?", o["position"], qtype)

    quota = quotas(n, {"colour": (1, [("colour", c) for c in COLOURS]), "shape": (1, [("shape", s) for s in SHAPES]),
                       "position": (1, [("position", p) for p in POSITIONS])})
    key = lambda r: (r["type"], r["answer"])
    return interleave(balanced(candidates(), quota, key), key)


def _pair_questions(objects: list[dict], category: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """MME-style (yes question, no question) of one category, or None when the scene cannot ask it."""
    present = {(o["colour"], o["shape"]) for o in objects}
    if category == "existence":
        o = objects[int(rng.integers(len(objects)))]
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return (f"Is there {an(o['colour'])} {o['shape']} in this image?{YESNO}",
                f"Is there {an(c)} {s} in this image?{YESNO}")
    if category == "colour":
        pool = _unique(objects, "shape")
        if not pool:
            return None
        o = pool[int(rng.integers(len(pool)))]
        wrong = str(rng.choice([c for c in COLOURS if c != o["colour"]]))
        return f"Is the {o['shape']} {o['colour']}?{YESNO}", f"Is the {o['shape']} {wrong}?{YESNO}"
    if category == "position":
        pool = _unique(objects, "colour")
        if not pool:
            return None
        o = pool[int(rng.integers(len(pool)))]
        wrong = str(rng.choice([p for p in POSITIONS if p not in {q["position"] for q in objects}]))
        return (f"Is the {o['colour']} {o['shape']} {where(o['position'])}?{YESNO}",
                f"Is the {o['colour']} {o['shape']} {where(wrong)}?{YESNO}")
    o = objects[int(rng.integers(len(objects)))]
    n = _count(objects, o)
    wrong = int(rng.choice([k for k in (1, 2, 3, 4) if k != n]))
    verb = lambda k: "Is there" if k == 1 else "Are there"
    return (f"{verb(n)} {_things(o['colour'], o['shape'], n)} in the image?{YESNO}",
            f"{verb(wrong)} {_things(o['colour'], o['shape'], wrong)} in the image?{YESNO}")


def make_mme(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """n // 2 images, two questions each (one "Yes", one "No", in alternating order), categories in turn."""
    categories = ("existence", "colour", "position", "count")
    out = []
    for index, scene in scenes(seed, "shapes", size, MIN_GROUPS, heldout):
        if len(out) >= n:
            break
        category = categories[(len(out) // 2) % len(categories)]
        pair = _pair_questions(scene.objects, category, np.random.default_rng([seed, index]))
        if pair is None:
            continue
        rows = [_record(index, scene, pair[0], "Yes", category), _record(index, scene, pair[1], "No", category)]
        out += rows if (len(out) // 2) % 2 == 0 else rows[::-1]
    out = out[:n]
    for i, r in enumerate(out):
        r["id"] = i
    return out


def _popularity(seed: int, size: int, heldout: bool) -> list[tuple[str, str]]:
    """(colour, shape) pairs by how many of the task's first 500 scenes hold them (POPE's "popular" objects)."""
    counts: Counter = Counter()
    stream = scenes(seed, "shapes", size, MIN_GROUPS, heldout)
    for _ in range(500):
        _, scene = next(stream)
        counts.update({(o["colour"], o["shape"]) for o in scene.objects})
    return [pair for pair, _ in counts.most_common()]


def make_pope(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """Per image one present object ("yes") and one absent ("no"); the negative is random, popular (the most
    frequent absent pair) or adversarial (shares the colour or the shape of a present object), in turn."""
    ranked = _popularity(seed, size, heldout)
    categories = ("random", "popular", "adversarial")
    out = []
    for index, scene in scenes(seed, "shapes", size, MIN_GROUPS, heldout):
        if len(out) >= n:
            break
        rng = np.random.default_rng([seed, index])
        category = categories[(len(out) // 2) % 3]
        present = {(o["colour"], o["shape"]) for o in scene.objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if category == "popular":
            neg = next(p for p in ranked + absent if p not in present)
        elif category == "adversarial":
            near = [(c, s) for c, s in absent if any(c == o[0] or s == o[1] for o in present)]
            neg = near[int(rng.integers(len(near)))]
        else:
            neg = absent[int(rng.integers(len(absent)))]
        c, s = sorted(present)[int(rng.integers(len(present)))]
        rows = [_record(index, scene, f"Is there {an(c)} {s} in the image?", "Yes", category),
                _record(index, scene, f"Is there {an(neg[0])} {neg[1]} in the image?", "No", category)]
        out += rows if (len(out) // 2) % 2 == 0 else rows[::-1]
    out = out[:n]
    for i, r in enumerate(out):
        r["id"] = i
    return out


def make_seed(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """Four options; the right one at A, B, C, D in turn; colour, shape, position and count questions in turn."""
    qtypes = ("colour", "shape", "position", "count")
    out = []
    for index, scene in scenes(seed, "shapes", size, MIN_GROUPS, heldout):
        if len(out) >= n:
            break
        i = len(out)
        qtype, slot = qtypes[i % 4], (i // 4 + i) % 4
        rng = np.random.default_rng([seed, index])
        objects = scene.objects
        pool = _unique(objects, "shape" if qtype == "colour" else "colour")
        if not pool:
            continue
        o = pool[int(rng.integers(len(pool)))]
        if qtype == "colour":
            q, right, others = f"What colour is the {o['shape']}?", o["colour"], \
                [c for c in COLOURS if c != o["colour"]]
        elif qtype == "shape":
            q, right, others = f"What shape is the {o['colour']} object?", o["shape"], \
                [s for s in SHAPES if s not in {p["shape"] for p in objects}]
        elif qtype == "position":
            q, right, others = f"Where is the {o['colour']} {o['shape']}?", o["position"], \
                [p for p in POSITIONS if p not in {x["position"] for x in objects}]
        else:
            k = _count(objects, o)
            q, right, others = f"How many {o['colour']} {o['shape']}s are there?", str(k), \
                [str(x) for x in range(1, 7) if x != k]
        if len(others) < 3:
            continue
        distractors = [str(x) for x in rng.choice(others, 3, replace=False)]
        text, letter = lettered(q, right, distractors, slot)
        out.append(_record(index, scene, text, letter, qtype))
    for i, r in enumerate(out):
        r["id"] = i
    return out
