"""Generators over text and chart scenes ((word, colour) and (bar colour, bar count) combinations: held-out ones,
or those training draws from) and over real Fashion-MNIST images: TextVQA-, OCRBench-, ChartQA- and ScienceQA-like
tasks, and ov2_fashion.

Each `make_<task>(n, seed, size, heldout, split) -> list[record]` is a pure function of its arguments
(benchmarks.evals.suite.build: synthetic scenes split by seed, Fashion-MNIST by `split`).
"""

from __future__ import annotations

import numpy as np

from benchmarks.evals.suite.common import balanced, interleave, lettered, quotas, scenes


def _record(index: int, image, question: str, answer: str, qtype: str) -> dict:
    return {"id": 0, "image_id": index, "image": image, "question": question, "answer": answer, "type": qtype}


def _words(n: int, seed: int, size: int, question: str, heldout: bool) -> list[dict]:
    from encoder.data.synth import WORDS

    rows = (_record(i, s.image, question, s.meta["word"], "word")
            for i, s in scenes(seed, "text", size, heldout=heldout))
    key = lambda r: r["answer"]
    return interleave(balanced(rows, quotas(n, {"words": (1, list(WORDS))}), key), key)


def make_textvqa(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    return _words(n, seed, size, "What word is written in the image?", heldout)


def make_ocrbench(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    return _words(n, seed, size, "What is written in the image?", heldout)


def make_chartqa(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """"What is the value of bar C?" (answers 1-9, 2/3) and "Which bar is taller, A or D?" (1/3; the taller one
    named first or second equally often)."""

    def candidates():
        for index, scene in scenes(seed, "chart", size, heldout=heldout):
            rng = np.random.default_rng([seed, index])
            labels, values = scene.meta["labels"], scene.meta["values"]
            if index % 3 < 2:
                k = int(rng.integers(len(labels)))
                yield _record(index, scene.image, f"What is the value of bar {labels[k]}?", str(values[k]), "value")
                continue
            i, j = (int(x) for x in rng.choice(len(labels), 2, replace=False))
            if values[i] == values[j]:
                continue
            big = labels[i] if values[i] > values[j] else labels[j]
            row = _record(index, scene.image, f"Which bar is taller, {labels[i]} or {labels[j]}?", big, "compare")
            row["slot"] = "first" if big == labels[i] else "second"
            yield row

    key = lambda r: (r["type"], r.get("slot", r["answer"]))
    quota = quotas(n, {"value": (2, [("value", str(v)) for v in range(1, 10)]),
                       "compare": (1, [("compare", "first"), ("compare", "second")])})
    rows = interleave(balanced(candidates(), quota, key), key)
    for r in rows:
        r.pop("slot", None)
    return rows


def make_sqa(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """ScienceQA's layout (Context line, question, lettered options) over bar charts: which of two bars is larger
    (2 options) or which of three is the largest (3 options), in turn; the right letter rotates."""
    out = []
    for index, scene in scenes(seed, "chart", size, heldout=heldout):
        if len(out) >= n:
            break
        rng = np.random.default_rng([seed, index])
        labels, values = scene.meta["labels"], scene.meta["values"]
        i = len(out)
        k = 2 if i % 2 == 0 else 3
        picked = [int(x) for x in rng.choice(len(labels), k, replace=False)]
        vals = [values[p] for p in picked]
        if vals.count(max(vals)) > 1:
            continue
        best = labels[picked[vals.index(max(vals))]]
        others = [labels[p] for p in picked if labels[p] != best]
        if k == 2:
            q = f"Context: a bar chart.\nWhich bar has the larger value, {labels[picked[0]]} or {labels[picked[1]]}?"
        else:
            q = "Context: a bar chart.\nWhich of these bars has the largest value?"
        text, letter = lettered(q, best, others, (i // 2) % k)
        out.append(_record(index, scene.image, text, letter, "pair" if k == 2 else "largest"))
    for i, r in enumerate(out):
        r["id"] = i
    return out


def make_fashion(n: int, seed: int, size: int = 64, heldout: bool = True, split: str = "test") -> list[dict]:
    """Fashion-MNIST images of `split` (the test split is never in pretraining, which reads the train split; test
    images whose pixels also occur in the train split are skipped), classes in turn, four options, the right letter
    rotating. Every class is trained on, so `heldout` changes nothing here."""
    from encoder.data.fashion_mnist import CLASSES, load_split, to_image

    images, labels = load_split(split)
    seen = {img.tobytes() for img in load_split("train")[0]} if split == "test" else set()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    per_class = {c: [int(i) for i in order if labels[i] == c] for c in range(len(CLASSES))}
    out = []
    taken = {c: 0 for c in per_class}
    while len(out) < n:
        i = len(out)
        label = i % len(CLASSES)
        while True:
            index = per_class[label][taken[label]]
            taken[label] += 1
            if images[index].tobytes() not in seen:
                break
        others = [c for c in range(len(CLASSES)) if c != label]
        distractors = [CLASSES[int(c)] for c in np.random.default_rng([seed, index]).choice(others, 3, replace=False)]
        text, letter = lettered("Which item of clothing is shown in the image?", CLASSES[label], distractors,
                                (i + i // len(CLASSES)) % 4)
        out.append(_record(index, to_image(images[index], size), text, letter, "clothing"))
        out[-1]["id"] = i
    return out
