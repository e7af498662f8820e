"""lmms-eval hooks of the built-in suite (the YAMLs beside this file name them with `!function utils.NAME`).

lmms-eval loads this file by path, once per `!function`, and looks each NAME up on the module; it only adapts
benchmarks.evals.suite to lmms-eval's calls. The module-level hooks are made from the suite's table, one set a task:

    ov2_doc_to_visual, ov2_doc_to_text     every task (the YAML templates)
    <task>_doc_to_choice                   each likelihood-scored task (output_type multiple_choice): the options
    <task>_process_results                 one per task of TASKS
    agg_mean, agg_<metric>                 the aggregation of each metric (aggregation_name(metric))
"""

import ast

from benchmarks.evals.suite import metrics
from benchmarks.evals.suite.tasks import MC, TASKS


def ov2_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def ov2_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results_name(task: str) -> str:
    return f"{task}_process_results"


def doc_to_choice_name(task: str) -> str:
    return f"{task}_doc_to_choice"


def aggregation_name(metric: str) -> str:
    """agg_mean for each mean of the per-sample score (exact match, relaxed accuracy, acc_<type>), else agg_<metric>."""
    return "agg_mean" if metrics.is_mean_metric(metric) else f"agg_{metric}"


def likelihoods(results) -> list[float] | None:
    """The negative log-likelihoods of a multiple-choice question's options, from what lmms-eval 0.7.3 hands on: one
    (nll, is_greedy) per option, which its evaluator turns into the string "(nll, is_greedy)"; None when `results`
    are not that (generated text)."""
    out = []
    for r in results:
        if isinstance(r, str):
            try:
                r = ast.literal_eval(r)
            except (ValueError, SyntaxError):
                return None
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[1], bool)):
            return None
        out.append(float(r[0]))
    return out or None


def chosen(options: list[str], results) -> str:
    """The option with the least negative log-likelihood (the model's loss, lmms-eval 0.7.3's convention: lower is
    likelier), `results` holding one per option, in order."""
    nll = likelihoods(results)
    if nll is None or len(nll) != len(options):
        raise ValueError(f"expected one (nll, is_greedy) per option {options}, got {list(results)!r}")
    return options[nll.index(min(nll))]


def _doc_to_choice(task: str):
    match = TASKS[task].match

    def doc_to_choice(doc):
        return metrics.choices(match, doc["question"])

    doc_to_choice.__name__ = doc_to_choice_name(task)
    return doc_to_choice


def _process(task: str):
    spec = TASKS[task]

    def process_results(doc, results):
        if spec.output_type == MC and likelihoods(results) is not None:  # one (nll, is_greedy) per option
            prediction = chosen(metrics.choices(spec.match, doc["question"]), results)
        else:  # generated text (also a fixed-option task's, should it be run generating)
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
    hooks.update({doc_to_choice_name(t): _doc_to_choice(t) for t, spec in TASKS.items() if spec.output_type == MC})
    hooks["agg_mean"] = _aggregate("accuracy")
    for spec in TASKS.values():
        for metric in spec.metrics:
            hooks.setdefault(aggregation_name(metric), _aggregate(metric))
    return hooks


globals().update(_hooks())
