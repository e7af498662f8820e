"""The built-in suite's one table, TASKS: task name -> TaskSpec (report label, paper column, primary metric,
chance, default size, seed, prompt suffix, scorer, metrics, output type). The runner's default tasks, the report's
labels and paper columns, the lmms-eval hooks (benchmarks/evals/tasks/utils.py) all read it; tests/test_suite.py
checks the task YAMLs and their README against it.

`chance` is the expected primary metric of a uniform random guess among the answers each question allows
(for yes/no: 50/50; for MME that gives acc 0.5 and acc+ 0.25, so 75; for POPE's F1, 0.5). The answers of every
task are balanced, so a constant answer scores at or below chance (a constant "yes" on POPE: accuracy 0.5, F1 0.67).
Seeds are the suite's own (61_001...), none of them a training seed (pretraining 0 by default, the bridge's
TRAIN_SEED and TRAIN_SEED + 1); a task's train split (build.train_split) is drawn from seed + TRAIN_OFFSET.

Held-in and held-out, as in LLaVA-1.5 (whose instruction mix holds the train splits of VQAv2, GQA, TextVQA and
OCR-VQA while their test splits are scored): `heldout=False` tasks ask about scenes drawn like the training scenes
(the same (colour, shape) pairs, other seeds), so a bridge whose stage-2 mix holds their train split (the bridge's
`stage2_tasks`) is tested on unseen images of what it was taught; `heldout=True` tasks ask only about combinations
that no training set holds (`encoder.data.synth.is_heldout`: unseen colour-shape pairs, words in unseen colours,
charts of unseen colour and bar count): ov2_gqa_unseen is GQA over unseen pairs.

Output type: a task whose answer is one of a few fixed options (the letters of a lettered question, "Yes"/"No") is
scored by likelihood (lmms-eval's `multiple_choice`: the option the model finds likeliest after the prompt is its
answer, so every question gets one of the options); open answers are generated (`generate_until`).
Default sizes: at least MIN_N = 100 questions each, so that the standard error of an accuracy is at most 0.05.
This module imports no stage package (reports read it).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.evals.suite.prompts import LETTER, SHORT

MC = "multiple_choice"  # lmms-eval's output type of likelihood-scored tasks
TRAIN_OFFSET = 500_000  # a task's train split: seed + TRAIN_OFFSET (test seeds are 61_001 ... 61_010)
MIN_N = 100  # every default size: sqrt(0.5 * 0.5 / 100) = 0.05, the largest standard error of an accuracy


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label: str  # the report's name for it
    column: str | None  # the paper table's column this task stands for (reports/reference/*.csv); None: none
    primary: str
    chance: float
    n: int  # default number of questions
    seed: int
    suffix: str  # appended to every question (lmms-eval's post_prompt)
    match: str  # per-sample scorer, a key of metrics.MATCHERS
    metrics: tuple[str, ...]  # every metric the task reports (the primary first)
    kind: str  # one line: what is asked
    output_type: str = "generate_until"  # or MC: scored by likelihood over metrics.choices()
    heldout: bool = True  # True: only scene combinations no training set holds; False: drawn like training scenes
    generator: str = ""  # the task whose generator it shares (build.GENERATORS); "": its own


def _acc(*types: str) -> tuple[str, ...]:
    return tuple(f"acc_{t}" for t in types)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("ov2_textvqa", "TextVQA", "textvqa", "exact_match", 1 / 20, 200, 61_001, SHORT, "vqa",
             ("exact_match",), "read the word (20 words); VQA-normalised exact match"),
    TaskSpec("ov2_chartqa", "ChartQA", "chartqa", "relaxed_accuracy", 2 / 3 * 1 / 9 + 1 / 3 * 1 / 2, 150, 61_003,
             SHORT, "relaxed", ("relaxed_accuracy",) + _acc("value", "compare"),
             "bar values (2/3) and which of two bars is taller (1/3); relaxed accuracy (5%)"),
    TaskSpec("ov2_ocrbench", "OCRBench", "ocrbench", "score_1000", 1000 / 20, 200, 61_002, SHORT, "ocr",
             ("score_1000", "score", "accuracy"),
             "what is written (20 words); OCRBench counting: number correct, and per 1,000 questions"),
    TaskSpec("ov2_mme", "MME-P", "mme_p", "mme_score", 75.0, 200, 61_004, SHORT, "yesno",
             ("mme_score", "acc", "acc_plus") + _acc("existence", "colour", "position", "count"),
             "two yes/no questions per image (one yes, one no); MME score = 100 * (acc + acc+), max 200", MC,
             heldout=False),
    TaskSpec("ov2_seed", "SEED", "seed", "accuracy", 1 / 4, 200, 61_007, LETTER, "letter",
             ("accuracy",) + _acc("colour", "shape", "position", "count"),
             "four-option lettered multiple choice on colour, shape, position, count", MC, heldout=False),
    TaskSpec("ov2_sqa", "SQA", "sqa", "accuracy", 1 / 2 * 1 / 2 + 1 / 2 * 1 / 3, 150, 61_008, LETTER, "letter",
             ("accuracy",) + _acc("pair", "largest"),
             "ScienceQA-style context + lettered choice (2 or 3 options) over bar charts", MC),
    TaskSpec("ov2_gqa", "GQA", "gqa", "exact_match", (1 / 8 + 1 / 5 + 1 / 9) / 3, 210, 61_006, SHORT, "vqa",
             ("exact_match",) + _acc("colour", "shape", "position"),
             "attribute and spatial short answers (colour, shape, position: a third each); exact match",
             heldout=False),
    TaskSpec("ov2_pope", "POPE", "pope", "f1", 0.5, 210, 61_005, SHORT, "yesno",
             ("f1", "accuracy", "precision", "recall", "yes_ratio") + _acc("random", "popular", "adversarial"),
             "object existence, half yes; negatives random, popular or adversarial (a third each)", MC,
             heldout=False),
    TaskSpec("ov2_fashion", "Fashion-MNIST MC", None, "accuracy", 1 / 4, 200, 61_009, LETTER, "letter",
             ("accuracy",), "real Fashion-MNIST test images: which item of clothing, four lettered options", MC,
             heldout=False),
    TaskSpec("ov2_gqa_unseen", "GQA unseen pairs", None, "exact_match", (1 / 8 + 1 / 5 + 1 / 9) / 3, 210, 61_010,
             SHORT, "vqa", ("exact_match",) + _acc("colour", "shape", "position"),
             "GQA's questions over scenes holding a (colour, shape) pair no training scene holds", generator="ov2_gqa"),
)}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown built-in task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
