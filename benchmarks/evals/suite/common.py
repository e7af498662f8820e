"""What every generator shares: the stream of scenes (held-out or training-like), answer quotas, the record layout.

A record (one row of a task's dataset): {"id", "image_id", "image" (PIL), "question" (without the suffix),
"answer", "type"}. Generators draw candidates from `scenes(seed, kind, heldout=...)`: a held-out task's scenes are
those no training set contains (`encoder.data.synth.is_heldout`), a held-in task's are drawn like the training
scenes (the same combinations, other seeds); they keep them under per-answer quotas (`balanced`), so every answer
is equally frequent; `interleave` orders the rows round-robin over answers so that the first N rows (lmms-eval's
--limit) are balanced as well.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator

import numpy as np

MAX_DRAWS = 200_000


def scenes(seed: int, kind: str, size: int = 64, min_groups: int = 1, heldout: bool = True
           ) -> Iterator[tuple[int, object]]:
    """(index, scene) for every scene of `make_scene(seed, index, kinds=(kind,))` that `is_heldout` reserves
    (heldout=True) or leaves to training (heldout=False); for shapes, with at least `min_groups` groups."""
    from encoder.data.synth import is_heldout, make_scene

    for index in range(MAX_DRAWS):
        scene = make_scene(seed, index, size=size, kinds=(kind,))
        if is_heldout(scene) == heldout and (kind != "shapes" or len(scene.objects) >= min_groups):
            yield index, scene
    raise RuntimeError(f"fewer {kind} scenes than asked in {MAX_DRAWS} draws of seed {seed}")


def quotas(n: int, groups: dict[str, tuple[float, list[Hashable]]]) -> dict[Hashable, int]:
    """n split over groups by weight, then evenly over each group's keys (remainders to the first keys)."""
    names = list(groups)
    weights = np.array([groups[g][0] for g in names], dtype=float)
    sizes = np.floor(n * weights / weights.sum()).astype(int)
    sizes[: n - sizes.sum()] += 1
    out: dict[Hashable, int] = {}
    for g, size in zip(names, sizes):
        keys = groups[g][1]
        for i, key in enumerate(keys):
            out[key] = int(size) // len(keys) + (1 if i < int(size) % len(keys) else 0)
    return out


def balanced(candidates: Iterable[dict], quota: dict[Hashable, int], key: Callable[[dict], Hashable]) -> list[dict]:
    """Candidates kept while their key's quota lasts, until every quota is met."""
    left = dict(quota)
    need = sum(left.values())
    out = []
    for record in candidates:
        k = key(record)
        if left.get(k, 0) > 0:
            left[k] -= 1
            out.append(record)
            if len(out) == need:
                return out
    raise RuntimeError(f"candidates ran out with quotas left: { {k: v for k, v in left.items() if v} }")


def _round_robin(groups: dict) -> list:
    out = []
    while any(groups.values()):
        for k in list(groups):
            if groups[k]:
                out.append(groups[k].pop(0))
    return out


def interleave(records: list[dict], key: Callable[[dict], Hashable]) -> list[dict]:
    """Round-robin over question types, and within a type over keys (first-seen order); ids renumbered."""
    by_type: dict[Hashable, dict[Hashable, list[dict]]] = {}
    for r in records:
        by_type.setdefault(r["type"], {}).setdefault(key(r), []).append(r)
    out = _round_robin({t: _round_robin(groups) for t, groups in by_type.items()})
    for i, r in enumerate(out):
        r["id"] = i
    return out


def lettered(question: str, answer: str, distractors: list[str], slot: int) -> tuple[str, str]:
    """The question with options "A. ..." one per line, the right one at position `slot` -> (text, letter)."""
    options = list(distractors)
    options.insert(slot, answer)
    body = "\n".join(f"{letter}. {opt}" for letter, opt in zip("ABCDE", options))
    return f"{question}\n{body}", "ABCDE"[slot]
