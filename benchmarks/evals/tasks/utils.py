"""lmms-eval hooks of the built-in suite (the YAMLs beside this file name them with `!function utils.NAME`).

lmms-eval loads this file by path, once per `!function`; it only adapts benchmarks.evals.suite to lmms-eval's calls.
"""

from benchmarks.evals.suite import metrics
from benchmarks.evals.suite.tasks import TASKS


def ov2_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def ov2_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _process(task: str):
    spec = TASKS[task]

    def process_results(doc, results):
        prediction = results[0] if results else ""
        prediction = prediction if isinstance(prediction, str) else getattr(prediction, "text", str(prediction))
        record = metrics.sample_record(spec.match, prediction.strip(), doc["answer"], doc["type"], doc["image_id"])
        return {m: record for m in spec.metrics if not m.startswith("acc_") or m == f"acc_{doc['type']}"}

    process_results.__name__ = f"{task}_process_results"
    return process_results


def _aggregate(metric: str):
    def aggregation(records):
        return metrics.aggregate(metric, records)

    aggregation.__name__ = f"ov2_aggregate_{metric}"
    return aggregation


ov2_textvqa_process_results = _process("ov2_textvqa")
ov2_chartqa_process_results = _process("ov2_chartqa")
ov2_ocrbench_process_results = _process("ov2_ocrbench")
ov2_mme_process_results = _process("ov2_mme")
ov2_seed_process_results = _process("ov2_seed")
ov2_sqa_process_results = _process("ov2_sqa")
ov2_gqa_process_results = _process("ov2_gqa")
ov2_pope_process_results = _process("ov2_pope")
ov2_fashion_process_results = _process("ov2_fashion")

agg_mean = _aggregate("accuracy")  # every mean of the per-sample score (exact match, relaxed accuracy, acc_<type>)
agg_mme_score = _aggregate("mme_score")
agg_acc_plus = _aggregate("acc_plus")
agg_f1 = _aggregate("f1")
agg_precision = _aggregate("precision")
agg_recall = _aggregate("recall")
agg_yes_ratio = _aggregate("yes_ratio")
agg_score = _aggregate("score")
agg_score_1000 = _aggregate("score_1000")
