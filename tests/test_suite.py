"""Built-in benchmark suite: metrics against hand-worked examples; generators deterministic, disjoint from every
training set, balanced (a constant answer scores at or below the stated chance)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.evals.suite import metrics as M
from benchmarks.evals.suite.build import build_task, generate
from benchmarks.evals.suite.tasks import MC, MIN_N, TASKS, TRAIN_OFFSET

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


def test_mme_hooks_report_acc_plus_over_image_pairs():
    from benchmarks.evals.tasks import utils as hooks

    rows = [(0, "Yes", "Yes"), (0, "No", "No"), (1, "Yes", "No"), (1, "No", "No")]
    out = [hooks.ov2_mme_process_results({"answer": t, "type": "colour", "image_id": i}, [p]) for i, p, t in rows]
    assert all(set(o) == {"mme_score", "acc", "acc_plus", "acc_colour"} for o in out)
    assert hooks.agg_acc_plus([o["acc_plus"] for o in out]) == pytest.approx(0.5)  # image 0 both right, image 1 not
    assert hooks.agg_mean([o["acc"] for o in out]) == pytest.approx(0.75)
    assert M.type_of("acc_colour") == "colour" and M.type_of("acc_plus") is None and M.type_of("f1") is None


# --- the task YAMLs and their README agree with the table ----------------------------------------------------------


def _raw_yaml(path) -> dict:
    """A task YAML as written: `!function utils.NAME` kept as the string "utils.NAME"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_task_yamls_agree_with_the_table():
    from lmms_eval.utils import load_yaml_config

    from benchmarks.evals.evaluate import TASKS_DIR
    from benchmarks.evals.tasks.utils import aggregation_name, doc_to_choice_name, process_results_name

    assert sorted(p.stem for p in TASKS_DIR.glob("ov2_*.yaml")) == sorted(TASKS)
    templates = {"generate_until": "_default_template_ov2_yaml", MC: "_default_template_ov2_mc_yaml"}
    for output_type, template in templates.items():
        raw = _raw_yaml(TASKS_DIR / template)
        assert raw["doc_to_visual"] == "utils.ov2_doc_to_visual" and raw["doc_to_text"] == "utils.ov2_doc_to_text"
        assert raw["output_type"] == output_type and raw["doc_to_target"] == "answer"
        assert ("generation_kwargs" in raw) is (output_type == "generate_until")  # options are scored, not generated
        assert raw.get("target_delimiter", " ") == ("" if output_type == MC else " ")  # "A" right after the turn opens
    for name, spec in TASKS.items():
        raw = _raw_yaml(TASKS_DIR / f"{name}.yaml")
        assert raw["include"] == templates[spec.output_type] and "output_type" not in raw, name
        assert raw["task"] == name and raw["dataset_path"] == f"ov2_data/{name}"
        assert raw["process_results"] == f"utils.{process_results_name(name)}"
        assert raw.get("doc_to_choice") == (f"utils.{doc_to_choice_name(name)}" if spec.output_type == MC else None)
        assert raw["lmms_eval_specific_kwargs"] == {"default": {"pre_prompt": "", "post_prompt": spec.suffix}}
        assert tuple(m["metric"] for m in raw["metric_list"]) == spec.metrics, name
        for m in raw["metric_list"]:
            assert m["aggregation"] == f"utils.{aggregation_name(m['metric'])}", (name, m)
            assert m["higher_is_better"] is (m["metric"] != "yes_ratio"), (name, m)
        config = load_yaml_config(str(TASKS_DIR / f"{name}.yaml"), mode="full")  # every hook it names exists
        assert config["process_results"].__name__ == process_results_name(name)
        assert config["output_type"] == spec.output_type
        if spec.output_type == MC:
            assert config["doc_to_choice"].__name__ == doc_to_choice_name(name)


def test_fixed_option_answers_are_scored_by_likelihood_open_ones_generated():
    """Every task whose every answer is one of the question's options is multiple_choice, with doc_to_choice giving
    those options (the letters, or Yes/No) and the answer among them; open answers (words, numbers) are generated."""
    from benchmarks.evals.tasks import utils as hooks

    assert {n for n, s in TASKS.items() if s.output_type == MC} == {"ov2_mme", "ov2_seed", "ov2_sqa", "ov2_pope",
                                                                   "ov2_fashion"}
    for name, spec in TASKS.items():
        rows = generate(name, n=12)
        if spec.output_type != MC:
            assert spec.match in ("vqa", "relaxed", "ocr") and M.choices(spec.match, rows[0]["question"]) is None
            continue
        for r in rows:
            options = getattr(hooks, f"{name}_doc_to_choice")(r)
            assert r["answer"] in options and len(set(options)) == len(options) >= 2, (name, r["question"], options)
            if spec.match == "letter":
                assert options == list("ABCDE"[:len(options)]) and r["question"].count("\n") >= len(options)
            else:
                assert options == ["Yes", "No"]
    assert M.choices("letter", "Context: a chart.\nWhich, A or B?\nA. B\nB. A") == ["A", "B"]  # option lines only


def test_likelihood_results_pick_the_least_loss_option():
    """The model answers (nll, is_greedy) per option, which lmms-eval 0.7.3 hands on as strings: the prediction is
    the option with the least negative log-likelihood, and it is scored like a generated answer would be."""
    from benchmarks.evals.tasks import utils as hooks

    assert hooks.chosen(["A", "B", "C"], [(3.0, False), (0.5, True), (2.0, False)]) == "B"
    assert hooks.chosen(["Yes", "No"], ["(1.25, False)", "(0.75, False)"]) == "No"
    assert hooks.likelihoods(["red"]) is None and hooks.likelihoods([]) is None
    with pytest.raises(ValueError, match="one \\(nll, is_greedy\\) per option"):
        hooks.chosen(["A", "B"], [(1.0, False)])
    doc = {"question": "Is there a red star in the image?", "answer": "No", "type": "random", "image_id": 3}
    out = hooks.ov2_pope_process_results(doc, ["(2.0, False)", "(1.0, True)"])
    assert out["f1"]["said"] == "no" and out["accuracy"]["score"] == 1.0 and out["f1"]["prediction"] == "No"
    doc = {"question": "What colour?\nA. red\nB. blue\nC. green", "answer": "C", "type": "colour", "image_id": 0}
    out = hooks.ov2_seed_process_results(doc, [(1.0, False), (2.0, False), (0.1, True)])
    assert out["accuracy"]["score"] == 1.0 and out["accuracy"]["prediction"] == "C" and "acc_colour" in out


def test_default_sizes_give_stderr_at_most_005():
    for name, spec in TASKS.items():
        assert spec.n >= MIN_N, name
        assert (0.25 / spec.n) ** 0.5 <= 0.05 + 1e-12  # an accuracy's standard error at its largest (p = 0.5)


def test_task_readme_agrees_with_the_table():
    from benchmarks.evals.evaluate import TASKS_DIR

    rows = [line.strip("|").split(" | ") for line in (TASKS_DIR / "README.md").read_text().splitlines()
            if line.startswith("| ov2_")]
    assert [r[0].strip() for r in rows] == list(TASKS)
    for name, column, primary, chance, n, scenes, scored, kind in rows:
        spec = TASKS[name.strip()]
        assert (column, primary, chance, int(n)) == (spec.column or "-", spec.primary, f"{spec.chance:.3g}", spec.n)
        assert scenes == ("unseen" if spec.heldout else "trained"), name
        assert scored == ("likelihood" if spec.output_type == MC else "generation"), name
        assert kind.strip() == spec.kind


def test_suite_and_reports_import_no_bridge():
    """The benchmark is not defined inside the bridge's training data: the suite, its hooks and the report's reader
    import no bridge module (the bridge imports the suite's prompt suffixes, not the other way)."""
    import subprocess
    import sys

    code = ("import sys; import benchmarks.evals.suite.build, benchmarks.evals.tasks.utils, reports.collect; "
            "from benchmarks.evals.suite.build import generate; generate('ov2_gqa', n=3); generate('ov2_sqa', n=3); "
            "print(sorted(m for m in sys.modules if m == 'bridge' or m.startswith('bridge.')))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


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
    from bridge.data import HELDOUT_SEED, TRAIN_SEED
    from encoder.data.synth import is_heldout, make_scene

    seeds = [t.seed for t in TASKS.values()] + [t.seed + TRAIN_OFFSET for t in TASKS.values()]  # test, train splits
    assert len(set(seeds)) == len(seeds) and not set(seeds) & {0, TRAIN_SEED, TRAIN_SEED + 1, HELDOUT_SEED}
    # by construction: training sets never use a held-out scene, and every held-out task's scene is one
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
    from benchmarks.evals.suite.prompts import LETTER
    from bridge.data import SynthInstructions
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
