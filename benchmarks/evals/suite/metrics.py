"""The suite's metrics, each the one its benchmark uses; pure functions of (prediction, target) or of records.

Per sample (-> 0.0 / 1.0):
    vqa_match(pred, target)        TextVQA / VQAv2 / GQA: both sides through lmms-eval's EvalAIAnswerProcessor
                                   (lower case, punctuation, articles dropped, number words -> digits), then equal
    relaxed_match(pred, target)    ChartQA: numbers within 5% of the target (|p - t| / |t| <= 0.05), else exact
    ocr_match(pred, target)        OCRBench: the target (lower case) is contained in the prediction
    letter_match(pred, target)     multiple choice: the option letter the prediction starts with
    yesno(pred)                    "yes" / "no" / None, as POPE and MME read an answer
    choices(match, question)       the options a likelihood-scored question is answered with: its letters, or
                                   ["Yes", "No"]; None for open answers
Aggregates over records (dicts with "score" and task fields):
    mme_scores(records)            acc, acc_plus (both questions of an image right), mme_score = 100 * (acc + acc+)
    pope_scores(records)           accuracy, precision, recall, f1, yes_ratio (positive class: "yes")
    ocrbench_scores(records)       score (number correct: OCRBench's counting), score_1000 (per 1,000 questions)
    accuracy_by_type(records)      {type: accuracy}
    aggregate(metric, records)     any of the above by metric name; is_mean_metric(metric): a mean of the scores;
                                   type_of(metric): the question type of a per-type accuracy acc_<type>
"""

from __future__ import annotations

import math
import re
from collections import defaultdict


def vqa_normalise(text: str) -> str:
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()(str(text))


def vqa_match(prediction: str, target: str) -> float:
    return float(vqa_normalise(prediction) == vqa_normalise(target))


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Methani et al.; the Qwen-VL code lmms-eval uses), after trimming a final '.'."""
    prediction, target = str(prediction).strip().rstrip("."), str(target).strip()
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_change)
    return float(prediction.lower() == target.lower())


def ocr_match(prediction: str, target: str) -> float:
    return float(str(target).lower().strip() in str(prediction).lower().strip())


_LETTER = re.compile(r"^\(?([A-E])(?:[).:,\s]|$)")


def choice_letter(prediction: str) -> str | None:
    """"B", "B.", "(B) red", "B. red" -> "B"; anything else -> None."""
    m = _LETTER.match(str(prediction).strip())
    return m.group(1) if m else None


def letter_match(prediction: str, target: str) -> float:
    return float(choice_letter(prediction) == target)


def yesno(prediction: str) -> str | None:
    words = re.findall(r"[a-z]+", str(prediction).lower())
    if not words:
        return None
    return words[0] if words[0] in ("yes", "no") else None


def yesno_match(prediction: str, target: str) -> float:
    return float(yesno(prediction) == str(target).lower())


_OPTION = re.compile(r"^([A-E])\. ", re.MULTILINE)
YES_NO = ("Yes", "No")


def choices(match: str, question: str) -> list[str] | None:
    """The options as the model would answer them: the letters of a lettered question ("...\nA. red\nB. blue" ->
    ["A", "B"]), "Yes"/"No" for yes/no questions; None where the answer is open."""
    if match == "letter":
        return _OPTION.findall(question)
    return list(YES_NO) if match == "yesno" else None


MEAN_METRICS = ("exact_match", "relaxed_accuracy", "accuracy", "acc")  # and every acc_<type>: means of "score"


def type_of(metric: str) -> str | None:
    """The question type of a per-type accuracy ("acc_colour" -> "colour"); None for other metrics (MME's acc_plus
    is not one: it scores image pairs)."""
    return metric[4:] if metric.startswith("acc_") and metric != "acc_plus" else None


def is_mean_metric(metric: str) -> bool:
    return metric in MEAN_METRICS or type_of(metric) is not None


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def mme_scores(records: list[dict]) -> dict:
    """Records carry "image_id" and "score"; MME scores each image's question pair."""
    by_image: dict = defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(r["score"])
    acc = mean(r["score"] for r in records)
    acc_plus = mean(float(all(s == 1.0 for s in scores)) for scores in by_image.values())
    per_image = [100.0 * (mean(s) + float(all(x == 1.0 for x in s))) for s in by_image.values()]
    n = len(per_image)
    spread = math.sqrt(sum((v - mean(per_image)) ** 2 for v in per_image) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return {"acc": acc, "acc_plus": acc_plus, "mme_score": 100.0 * (acc + acc_plus), "mme_score_stderr": spread}


def pope_scores(records: list[dict]) -> dict:
    """Records carry "target" ("yes"/"no") and "said" ("yes", "no" or None: no answer, wrong either way)."""
    tp = sum(r["said"] == "yes" and r["target"] == "yes" for r in records)
    fp = sum(r["said"] == "yes" and r["target"] == "no" for r in records)
    fn = sum(r["said"] != "yes" and r["target"] == "yes" for r in records)
    tn = sum(r["said"] == "no" and r["target"] == "no" for r in records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(records)
    return {"accuracy": (tp + tn) / n if n else float("nan"), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else float("nan")}


def ocrbench_scores(records: list[dict]) -> dict:
    correct = sum(r["score"] for r in records)
    return {"score": correct, "score_1000": 1000.0 * correct / len(records) if records else float("nan")}


def accuracy_by_type(records: list[dict]) -> dict[str, float]:
    by_type: dict = defaultdict(list)
    for r in records:
        by_type[r.get("type")].append(r["score"])
    return {t: mean(v) for t, v in by_type.items()}


MATCHERS = {"vqa": vqa_match, "relaxed": relaxed_match, "ocr": ocr_match, "letter": letter_match,
            "yesno": yesno_match}


def sample_record(match: str, prediction: str, target: str, qtype: str | None = None, image_id: int | None = None) \
        -> dict:
    """The per-sample record every aggregate reads: score (0/1), the parsed yes/no, and the fields to group by."""
    return {"score": MATCHERS[match](prediction, target), "said": yesno(prediction), "target": str(target).lower(),
            "type": qtype, "image_id": image_id, "prediction": prediction}


def aggregate(metric: str, records: list[dict]) -> float:
    """One metric over the records of a task (acc_<type> metrics get only that type's records)."""
    if is_mean_metric(metric):
        return mean(r["score"] for r in records)
    if metric in ("mme_score", "acc_plus"):
        return mme_scores(records)[metric]
    if metric in ("f1", "precision", "recall", "yes_ratio"):
        return pope_scores(records)[metric]
    if metric in ("score", "score_1000"):
        return ocrbench_scores(records)[metric]
    raise KeyError(f"unknown suite metric {metric!r}")


def stderr(metric: str, records: list[dict]) -> float | None:
    """Standard error of a metric where it has a closed form: means of 0/1 scores (and of yes answers), the OCRBench
    scale, the MME score (over images); None otherwise (F1, precision, recall)."""
    n = len(records)
    if n < 2:
        return None

    def sem(values):
        m = mean(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)

    if is_mean_metric(metric):
        return sem([r["score"] for r in records])
    if metric == "yes_ratio":
        return sem([float(r["said"] == "yes") for r in records])
    if metric == "score_1000":
        return 1000.0 * sem([r["score"] for r in records])
    if metric == "mme_score":
        return mme_scores(records)["mme_score_stderr"]
    return None
