"""lmms-eval hooks of the built-in suite (the YAMLs beside this file name them with `!function utils.NAME`).

lmms-eval loads this file by path, once per `!function`, and looks each NAME up on the module; it only adapts
benchmarks.evals.suite to lmms-eval's calls. The module-level hooks are made from the suite's table, one set a task:

    ov2_doc_to_visual, ov2_doc_to_text     every task (the YAML template)
    <task>_process_results                 one per task of TASKS
    agg_mean, agg_<metric>                 the aggregation of each metric (aggregation_name(metric))
"""

from benchmarks.evals.suite import metrics
from benchmarks.evals.suite.tasks import TASKS


def ov2_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def ov2_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results_name(task: str) -> str:
    return f"{task}_process_results"


def aggregation_name(metric: str) -> str:
    """agg_mean for each mean of the per-sample score (exact match, relaxed accuracy, acc_<type>), else agg_<metric>."""
    return "agg_mean" if metrics.is_mean_metric(metric) else f"agg_{metric}"


def _process(task: str):
    spec = TASKS[task]

    def process_results(doc, results):
        prediction = results[0] if results else ""
        prediction = prediction if isinstance(prediction, str) else getattr(prediction, "text", str(prediction))
        record = metrics.sample_record(spec.match, prediction.strip(), doc["answer"], doc["type"], doc["image_id"])
        return {m: record for m in spec.metrics if metrics.type_of(m) in (None, doc["type"])}

    process_results.__name__ = process_results_name(task)
    return process_results


def _aggregate(metric: str):
    def aggregation(records):
        return metrics.aggregate(metric, records)

    aggregation.__name__ = f"ov2_aggregate_{metric}"
    return aggregation


def _hooks() -> dict:
    hooks = {process_results_name(task): _process(task) for task in TASKS}
    hooks["agg_mean"] = _aggregate("accuracy")
    for spec in TASKS.values():
        for metric in spec.metrics:
            hooks.setdefault(aggregation_name(metric), _aggregate(metric))
    return hooks


globals().update(_hooks())
