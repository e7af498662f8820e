"""Built-in benchmark suite: metrics against hand-worked examples; generators deterministic, disjoint from every
training set, balanced (a constant answer scores at or below the stated chance)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from benchmarks.evals.suite import metrics as M
from benchmarks.evals.suite.build import build_task, generate
from benchmarks.evals.suite.tasks import TASKS

# --- metrics ------------------------------------------------------------------------------------------------------


def test_vqa_normalisation_articles_punctuation_number_words():
    assert M.vqa_normalise("The Apple.") == "apple"
    assert M.vqa_normalise("an apple!") == "apple"
    assert M.vqa_normalise("Two") == "2" and M.vqa_match("two", "2") == 1.0
    assert M.vqa_match("ten dogs", "10 dogs") == 1.0
    assert M.vqa_match("  Red ", "red") == 1.0
    assert M.vqa_match("a red star", "red") == 0.0  # normalised, then exact: extra words are wrong


def test_relaxed_accuracy_five_percent_boundary():
    assert M.relaxed_match("21", "20") == 1.0  # exactly 5%
    assert M.relaxed_match("19", "20") == 1.0
    assert M.relaxed_match("21.2", "20") == 0.0  # 6%
    assert M.relaxed_match("18.9", "20") == 0.0
    assert M.relaxed_match("5.", "5") == 1.0  # a final full stop is trimmed
    assert M.relaxed_match("6", "5") == 0.0  # integers: 20% off
    assert M.relaxed_match("50%", "0.5") == 1.0
    assert M.relaxed_match("B", "b") == 1.0 and M.relaxed_match("C", "B") == 0.0  # labels: exact (any case)


def test_ocrbench_counting_and_letters():
    records = [M.sample_record("ocr", p, t) for p, t in
               [("the word is apple", "apple"), ("APPLE", "apple"), ("appl", "apple"), ("", "river")]]
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert M.ocrbench_scores(records) == {"score": 2.0, "score_1000": 500.0}
    assert [M.choice_letter(x) for x in ("B", "B.", "(C) red", "D. red", "Blue", "b", "")] == \
        ["B", "B", "C", "D", None, None, None]


def test_mme_acc_plus_and_score():
    # image 0: both right; image 1: one right; image 2: none right -> acc 3/6, acc+ 1/3
    rows = [(0, "Yes", "Yes"), (0, "No", "No"), (1, "Yes", "No"), (1, "No", "No"), (2, "No", "Yes"), (2, "yes", "No")]
    records = [M.sample_record("yesno", p, t, image_id=i) for i, p, t in rows]
    scores = M.mme_scores(records)
    assert scores["acc"] == pytest.approx(0.5) and scores["acc_plus"] == pytest.approx(1 / 3)
    assert scores["mme_score"] == pytest.approx(100 * (0.5 + 1 / 3))
    assert M.aggregate("mme_score", records) == pytest.approx(83.333, abs=1e-3)
    # per-image values 200, 50, 0 -> sample sd 104.08, over sqrt(3)
    assert scores["mme_score_stderr"] == pytest.approx(np.std([200, 50, 0], ddof=1) / np.sqrt(3))


def test_pope_f1_and_yes_ratio():
    pairs = [("Yes", "yes"), ("yes.", "yes"), ("No", "yes"), ("Yes", "no"), ("No", "no"), ("no", "no"),
             ("maybe", "no")]
    records = [M.sample_record("yesno", p, t) for p, t in pairs]
    s = M.pope_scores(records)
    # tp 2, fn 1, fp 1, tn 2, one non-answer (wrong, and not a "yes")
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 7)
    assert s["accuracy"] == pytest.approx(4 / 7) == M.aggregate("accuracy", records)


# --- generators ---------------------------------------------------------------------------------------------------


def _digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r["image"]).tobytes())
        h.update(f"{r['question']}|{r['answer']}|{r['type']}|{r['image_id']}".encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", list(TASKS))
def test_generator_deterministic_and_seeded(name):
    a, b = generate(name, n=24), generate(name, n=24)
    assert len(a) == 24 and _digest(a) == _digest(b)
    assert _digest(generate(name, n=24, seed=TASKS[name].seed + 1)) != _digest(a)


def test_written_dataset_same_bytes(tmp_path):
    import datasets

    paths = [build_task("ov2_mme", tmp_path / f"mme{i}", n=20) for i in range(2)]
    files = [sorted(p.rglob("*.arrow")) for p in paths]
    assert files[0] and [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in files[1]]
    ds = datasets.load_from_disk(str(paths[0]))["test"]
    assert len(ds) == 20 and set(ds.column_names) >= {"image", "question", "answer", "type", "image_id"}
    assert ds[0]["image"].size == (64, 64)


def _train_keys(n: int) -> tuple[set, set]:
    """Image hashes of pretraining (seed 0 stream) and bridge (stage 1 and 2) records, and the bridge's
    (image, question) pairs."""
    from bridge.data import SynthCaptions, SynthInstructions
    from encoder.data.synth import make_scene

    images = {hashlib.sha1(np.asarray(make_scene(0, i).image).tobytes()).hexdigest() for i in range(n)}
    pairs = set()
    for data in (SynthCaptions(n), SynthInstructions(n)):
        for i in range(n):
            r = data[i]
            h = hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest()
            images.add(h)
            pairs.add((h, r["conversations"][0]["value"]))
    return images, pairs


def test_suite_disjoint_from_training():
    from bridge.data import HELDOUT_SEED, TRAIN_SEED, is_heldout
    from encoder.data.synth import make_scene

    seeds = [t.seed for t in TASKS.values()]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & {0, TRAIN_SEED, TRAIN_SEED + 1, HELDOUT_SEED}
    # by construction: training sets never use a held-out scene, and every suite scene is one
    from bridge.data import training_scene

    assert not any(is_heldout(training_scene(TRAIN_SEED, i, 64, ("shapes", "text", "chart"))) for i in range(300))
    assert sum(is_heldout(make_scene(TRAIN_SEED, i)) for i in range(300)) > 20  # the filter had work to do
    # and by hashing: no suite image (nor image + question) is among 1500 pretraining and bridge records
    images, pairs = _train_keys(1500)
    for name in TASKS:
        for r in generate(name, n=30):
            h = hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest()
            assert h not in images, name
            assert (h, "<image>\n" + r["question"] + TASKS[name].suffix) not in pairs, name


def test_fashion_uses_test_images_not_in_train():
    from encoder.data.fashion_mnist import load_split

    train, _ = load_split("train")
    test, labels = load_split("test")
    rows = generate("ov2_fashion", n=20)
    train_bytes = {x.tobytes() for x in train}
    assert all(test[r["image_id"]].tobytes() not in train_bytes for r in rows)
    assert sorted(Counter(int(labels[r["image_id"]]) for r in rows).values()) == [2] * 10


def _constant_best(name: str, rows: list[dict], metric: str) -> float:
    spec = TASKS[name]
    best = 0.0
    for answer in {r["answer"] for r in rows} | {"Yes", "No"}:
        records = [M.sample_record(spec.match, answer, r["answer"], r["type"], r["image_id"]) for r in rows]
        best = max(best, M.aggregate(metric, records))
    return best


@pytest.mark.parametrize("name", list(TASKS))
def test_balanced_constant_answer_at_most_chance(name):
    spec = TASKS[name]
    rows = generate(name)
    assert len(rows) == spec.n
    if name == "ov2_pope":  # F1 rewards "always yes" (0.67); POPE's balance shows in accuracy and yes-ratio
        assert _constant_best(name, rows, "accuracy") == pytest.approx(0.5)
        assert Counter(r["answer"] for r in rows) == {"Yes": spec.n // 2, "No": spec.n // 2}
        assert Counter(r["type"] for r in rows) == {t: spec.n // 3 for t in ("random", "popular", "adversarial")}
        return
    best = _constant_best(name, rows, spec.primary)
    assert best <= spec.chance * 1.05 + 1e-9, (best, spec.chance)
    if name in ("ov2_textvqa", "ov2_ocrbench", "ov2_seed", "ov2_fashion", "ov2_sqa"):
        assert best == pytest.approx(spec.chance, rel=0.05)  # every answer equally often


def test_random_guessing_scores_chance():
    rng = np.random.default_rng(0)
    for name in ("ov2_mme", "ov2_pope"):
        spec = TASKS[name]
        rows = generate(name, n=2000 if name == "ov2_mme" else 1998)
        records = [M.sample_record(spec.match, str(rng.choice(["Yes", "No"])), r["answer"], r["type"], r["image_id"])
                   for r in rows]
        assert M.aggregate(spec.primary, records) == pytest.approx(spec.chance, rel=0.06), name


def test_bridge_fashion_kind_teaches_the_suite_format_on_train_images():
    from bridge.data import LETTER, SynthInstructions
    from encoder.data.fashion_mnist import CLASSES

    data = SynthInstructions(40, image_size=64, kinds=("fashion",))
    items = [data[i] for i in range(40)]
    assert {it["type"] for it in items} == {"fashion", "choice"}
    choice = next(it for it in items if it["type"] == "choice")
    assert choice["question"].startswith("Which item of clothing is shown in the image?\nA. ")
    assert choice["question"].endswith(LETTER) and choice["answer"] in "ABCD"
    assert all(it["answer"] in CLASSES for it in items if it["type"] == "fashion")
    suite = {np.asarray(r["image"]).tobytes() for r in generate("ov2_fashion", n=100)}
    assert not any(np.asarray(it["image"]).tobytes() in suite for it in items)
