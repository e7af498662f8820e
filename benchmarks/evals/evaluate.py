"""`ov2 eval`: score any standard LLaVA folder with lmms-eval's own `llava_hf` model, task by task.

    ov2 eval runs/llava/model --tasks ov2_gqa,ov2_pope --out runs/eval                # built-in suite
    ov2 eval runs/llava/model --tasks ov2_gqa --limit 20 --out /tmp/smoke             # CPU smoke (20 questions)
    ov2 eval llava-1.5-7b-hf/ --tasks pope,gqa --out runs/eval7b                      # lmms-eval tasks, data cached
    torchrun --nproc_per_node 8 -m benchmarks.evals.evaluate MODEL --tasks ov2_gqa --out runs/eval   # per GPU

Under torchrun each process holds the model (cuda:LOCAL_RANK, or the CPU) and lmms-eval's torchrun backend shares
every task's questions among them and gathers the answers on rank 0, which alone writes OUT.

Built-in tasks (evals/suite; their YAMLs in evals/tasks) read their data from DATA/<task> and build it
there when it is missing (DATA defaults to OUT/data). Any other name is an lmms-eval task; its data must be in the
Hugging Face cache (nothing is downloaded); `--include DIR` adds a folder of your own lmms-eval task YAMLs. An
lmms-eval group (mmbench_en, scienceqa_full, ...) is reported per subtask: one scores.json entry for each of its
tasks (with "group"), and one for the group when lmms-eval aggregates it (with "subtasks"). Each named task or
group runs in its own `simple_evaluate` call (a crash raises, it does not exit 0), so one failing task (missing
data, an lmms-eval ERROR) leaves the others. An empty answer is a wrong answer: scored 0 and counted (`empty` in
scores.json), never a failed task. A likelihood-scored lmms-eval task stays a plain task (lmms-eval 0.7 would build
it as a chat model's messages task, which only generates).

Built-in tasks whose answer is one of a few options (letters, Yes/No: TaskSpec.output_type "multiple_choice") are
scored by likelihood: one-token options from the next-token distribution after the prompt, `--batch-size` questions
per forward pass, longer options from a pass each; the likeliest option is the answer (the sample's `prediction`).
Open answers are generated (greedy, 8 new tokens), `--batch-size` questions per generate call. The model runs in
bf16 where the device multiplies bf16 natively (`--bf16 auto`, as training), float32 elsewhere
(benchmarks.evals.adapter: lmms-eval's `llava_hf`, batched).

OUT/scores.json         {"model", "data_dir", "tasks": {task: {"status", "error", "primary", "metrics": {m: {"value",
                        "stderr"}}, "n", "chance", "wall_s"}}}
OUT/samples/<task>.jsonl  {"doc_id", "question", "target", "prediction", "score", "type"} per question (prediction:
                        the generated text, or the chosen option of a likelihood-scored task)
OUT/lmms_eval/          lmms-eval's own files: <task>_results.json and <task>_samples_<task>.jsonl
OUT/status.json         the stage's status (run-folder contract)
Exit codes: 0 every task ok; 1 a task failed (one line each on stderr); 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.evals.adapter import load_model
from benchmarks.evals.suite.metrics import is_mean_metric, type_of
from benchmarks.evals.suite.tasks import TASKS
from ov2.cli import fail

PROG = "ov2 eval"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
OUTPUTS = ("scores.json", "samples", "lmms_eval")
# what an evaluation folder may hold besides OUTPUTS (its own data, run-folder files, the runner's stage files)
OURS = (*OUTPUTS, "data", "status.json", ".lock", "stage.json", "stage.log")


def lmms_eval_task_names(include: tuple = ()) -> set[str]:
    """lmms-eval's task, group and tag names, read from its task YAML files and those under `include` (well under a
    second; building its TaskManager takes a minute on 2 cores)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        return set()
    pattern = re.compile(r"^(?:task|group|tag):\s*[\"']?([^\s\"'#\[]+)", re.M)
    names: set[str] = set()
    folders = [Path(spec.origin).parent / "tasks", *map(Path, include)]
    for path in (p for folder in folders for p in folder.rglob("*.yaml")):
        try:
            names.update(pattern.findall(path.read_text(errors="replace")))
        except OSError:
            continue
    return names


class BadInput(ValueError):
    """Bad arguments: exit code 2."""


class TasksFailed(RuntimeError):
    """At least one task failed; the scores are written (the stage's status records the first failure)."""


def _check(model_dir: Path, tasks: list[str], out: Path, limit, batch_size: int, force: bool,
           include: tuple = ()) -> None:
    config = model_dir / "config.json"
    if not config.is_file():
        raise BadInput(f"{model_dir} is not a model folder (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in LLAVA_TYPES:
        raise BadInput(f"{model_dir} holds a {model_type!r} model; llava_hf evaluates {', '.join(LLAVA_TYPES)}")
    if not tasks:
        raise BadInput("no tasks given (--tasks a,b)")
    for folder in include:
        if not Path(folder).is_dir():
            raise BadInput(f"--include {folder} is not a folder (lmms-eval task YAMLs)")
    if len(set(tasks)) != len(tasks):
        raise BadInput(f"a task is named twice in {','.join(tasks)}")
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if not force and any((out / name).exists() for name in OUTPUTS):
        raise BadInput(f"{out} already holds evaluation results: choose another --out or pass --force")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OURS) if out.is_dir() else []
    if foreign and not force:
        raise BadInput(f"--out {out} holds files that are not an evaluation's ({foreign[0]}, ...): choose an empty "
                       f"or new folder, or pass --force")
    unknown = [t for t in tasks if t not in TASKS and t not in lmms_eval_task_names(include)]
    if unknown:
        raise BadInput(f"unknown task(s) {', '.join(unknown)}: built-in are {', '.join(TASKS)}; others must be "
                       "lmms-eval task names (python -m lmms_eval tasks list)")


def quiet_lmms_eval() -> None:
    """lmms-eval logs through loguru (DEBUG by default, to stdout once its models module is imported): keep
    warnings and errors, on stderr, less the one our likelihood-scored tasks set off by design (an empty
    target_delimiter before options without whitespace: "A", "Yes")."""
    import lmms_eval.llm_judge.launcher  # noqa: F401  (its import resets loguru's handlers too)
    import lmms_eval.models  # noqa: F401  (its import resets loguru's handlers)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="lmms-eval {level}: {message}",
               filter=lambda record: "target_delimiter" not in record["message"])


def _dataset_of(task_manager, name: str) -> str:
    """The dataset an lmms-eval task reads (its YAML's dataset_path), for error messages."""
    from lmms_eval.utils import load_yaml_config

    try:
        config = load_yaml_config(task_manager.task_index[name]["yaml_path"], mode="simple")
        return f"dataset {config.get('dataset_path')} (Hugging Face cache)"
    except Exception:
        return f"the dataset of lmms-eval task {name}"


def _task_input(name: str, data_dir: Path, lm):
    """A built-in task as a Task object on DATA/<task> (its data loaded); an lmms-eval task by name."""
    from lmms_eval.api.task import ConfigurableMessagesTask, ConfigurableTask

    if name not in TASKS:
        return name
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(TASKS_DIR / f"{name}.yaml"), mode="full")
    config["dataset_path"] = str((data_dir / name).resolve())
    # lmms-eval's messages tasks only generate: a likelihood-scored task stays a plain ConfigurableTask
    simple = lm.is_simple or config.get("output_type") == "multiple_choice"
    cls = ConfigurableTask if simple else ConfigurableMessagesTask
    return cls(config=config, model_name="llava_hf")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) else None


def _prediction(sample: dict) -> str:
    """An lmms-eval task's answer as logged: the generated text, or for a multiple-choice task (one (nll, is_greedy)
    per option) the index of the likeliest option. Built-in tasks keep theirs in the per-sample record."""
    from benchmarks.evals.tasks.utils import likelihoods

    resp = sample.get("filtered_resps", [""])
    nll = likelihoods(resp) if isinstance(resp, list) and len(resp) > 1 else None
    if nll is not None:
        return str(nll.index(min(nll)))
    resp = resp[0] if isinstance(resp, list) and resp else resp
    resp = resp[0] if isinstance(resp, list) and resp else resp
    return resp if isinstance(resp, str) else str(getattr(resp, "text", resp or ""))


def _scores_entry(name: str, result: dict, samples: list[dict]) -> tuple[dict, list[dict]]:
    """(scores.json entry, our sample lines) from lmms-eval's results of one task."""
    from benchmarks.evals.suite import metrics as suite_metrics

    spec = TASKS.get(name)
    if spec is not None:
        records = [s[spec.primary] for s in samples if isinstance(s.get(spec.primary), dict)]
        names = [m for m in spec.metrics if f"{m},none" in result]
        primary, chance = spec.primary, spec.chance
    else:
        names = [k.split(",")[0] for k in result if "," in k and "_stderr" not in k]
        records, primary, chance = [], names[0] if names else None, None
    out = {}
    for m in names:
        stderr = _number(result.get(f"{m}_stderr,none"))
        if stderr is None and spec is not None:
            if is_mean_metric(m):
                stderr = _number(result.get(f"{m}_stderr_clt,none"))
            if stderr is None:
                subset = [r for r in records if type_of(m) in (None, r["type"])]
                stderr = suite_metrics.stderr(m, subset)
        value = result[f"{m},none"]
        out[m] = {"value": _number(value) if _number(value) is not None else value, "stderr": stderr}
    lines = []
    for s in samples:
        doc = s.get("doc") or {}
        record = s.get(primary)
        score = record.get("score") if isinstance(record, dict) else _number(record)
        prediction = record["prediction"] if isinstance(record, dict) and "prediction" in record else _prediction(s)
        question = doc.get("question")
        if spec is not None and question is not None:
            question += spec.suffix  # the prompt as asked (lmms-eval's post_prompt)
        elif question is None:
            args = s.get("arguments")
            question = args[0] if isinstance(args, (list, tuple)) and args and isinstance(args[0], str) else None
        lines.append({"doc_id": s.get("doc_id"), "question": question, "target": str(s.get("target")),
                      "prediction": prediction, "score": score, "type": doc.get("type")})
    return {"primary": primary, "metrics": out, "chance": chance}, lines


def run_task(lm, name: str, data_dir: Path, out: Path, limit: int | None, task_manager) -> dict | None:
    """Evaluate one task or group -> {task: its scores.json entry} (a group's tasks, and the group when lmms-eval
    aggregates it; None on a torchrun rank other than 0); raises with one line on failure."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from loguru import logger

    from ov2 import distributed as dist

    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m.record["message"].strip().splitlines()[0]), level="ERROR")
    tracker = EvaluationTracker(output_path=str(out / "lmms_eval"))
    model = lm._model  # simple_evaluate ends with lm.clean(), which deletes the model: put it back afterwards
    try:
        try:
            task = _task_input(name, data_dir, lm)
        except Exception as err:
            line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            where = data_dir / name if name in TASKS else _dataset_of(task_manager, name)
            raise RuntimeError(f"data missing: {where} could not be loaded (nothing is downloaded): {line}") from err
        try:
            results = simple_evaluate(model=lm, model_args="", tasks=[task], limit=limit, bootstrap_iters=1000,
                                      log_samples=True, evaluation_tracker=tracker, task_manager=task_manager,
                                      verbosity="WARNING", datetime_str=name,
                                      distributed_executor_backend="torchrun")
        except Exception as err:
            if name in TASKS:
                raise
            line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RuntimeError(f"lmms-eval task {name} failed (its data: {_dataset_of(task_manager, name)}; "
                               f"nothing is downloaded): {line}") from err
    finally:
        logger.remove(sink)
        lm._model = model
    if not dist.is_main():
        return None  # rank 0 gathered this rank's answers
    found = (results or {}).get("results", {})
    leaves = _leaves(results.get("group_subtasks", {}), name) if results else []
    if not leaves or any(leaf not in found for leaf in leaves):
        raise RuntimeError(f"lmms-eval returned no results for {name}")
    samples = results.pop("samples", {})
    tracker.general_config_tracker.model_name_sanitized = ""
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=name)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    entries = {}
    for leaf in leaves:
        entry, lines = _scores_entry(leaf, found[leaf], samples.get(leaf, []))
        tracker.save_results_samples(task_name=leaf, samples=samples.get(leaf, []))
        (out / "samples" / f"{leaf}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        entries[leaf] = {**entry, "n": len(lines), "empty": check_answers(lines, errors)}
        if leaf != name:
            entries[leaf]["group"] = name
    if leaves != [name] and any("," in k for k in found.get(name, {})):  # the group's own aggregate
        entry, _ = _scores_entry(name, found[name], [])
        entries[name] = {**entry, "n": sum(entries[t]["n"] for t in leaves),
                         "empty": sum(entries[t]["empty"] for t in leaves), "subtasks": leaves}
    return entries


def _leaves(subtasks: dict, name: str) -> list[str]:
    """The tasks lmms-eval ran for `name`: itself when it is a task, else its group's tasks (nested groups opened)
    in lmms-eval's order. `subtasks` is lmms-eval's group_subtasks ({group: [members], task: []})."""
    members = subtasks.get(name)
    if not members:
        return [name]
    return [leaf for member in members for leaf in _leaves(subtasks, member)]


def check_answers(lines: list[dict], errors: list[str]) -> int:
    """The number of empty answers. An empty answer is a wrong answer (its score is 0, it is counted and shown): a
    weak model's silence is a result. Only the evaluator failing (an ERROR in lmms-eval's log, no answers at all)
    fails the task."""
    if errors:
        raise RuntimeError(f"lmms-eval logged an ERROR: {errors[0]}")
    if not lines:
        raise RuntimeError("lmms-eval returned no answers")
    return sum(not str(line["prediction"]).strip() for line in lines)


def evaluate(model_dir, tasks: list[str], out, limit: int | None = None, data_dir=None, batch_size: int = 8,
             force: bool = False, progress: bool = True, include: tuple = (), bf16: str = "auto") -> dict:
    """Evaluate a LLaVA folder on `tasks` -> the scores dict (also OUT/scores.json). Raises BadInput for bad
    arguments; a failing task is recorded in the scores (status "failed") and the others still run.
    Under torchrun every rank answers its share of each task; rank 0 builds missing data and owns OUT."""
    import contextlib

    from ov2 import distributed as dist
    from ov2.runfolder import RunLock, track

    model_dir, out = Path(model_dir), Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    tasks = list(tasks)
    include = tuple(str(Path(p).resolve()) for p in include)
    _check(model_dir, tasks, out, limit, batch_size, force, include)
    precision = precision_of(bf16)
    quiet_lmms_eval()
    # lmms-eval's own ~3,000 task YAMLs take seconds to index: only when a task is not one of ours
    task_manager = task_manager_for(include, defaults=bool(include) or any(t not in TASKS for t in tasks))
    unknown = [t for t in tasks if t not in TASKS and t not in task_manager.all_tasks]
    if unknown:
        raise BadInput(f"unknown task(s) {', '.join(unknown)}: built-in are {', '.join(TASKS)}; others must be "
                       "lmms-eval task names (python -m lmms_eval tasks list)")
    dist.setup()
    dist.barrier()  # every rank has checked OUT before rank 0 clears it
    main = dist.is_main()
    scores = {"model": str(model_dir), "data_dir": str(data_dir), "tasks": {}}
    with contextlib.ExitStack() as owner:
        if main:
            owner.enter_context(RunLock(out))
            for name in OUTPUTS:
                path = out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            owner.enter_context(contextlib.suppress(TasksFailed))
            owner.enter_context(track(out, tasks=tasks, model=str(model_dir), limit=limit, batch_size=batch_size,
                                      precision=precision))
        missing = _build_data(tasks, data_dir) if main else {}
        dist.barrier()  # the data is on disk for every rank
        lm = load_model(model_dir, batch_size, bf16)
        for name in tasks:
            entries = _one(lm, name, data_dir, out, limit, task_manager, progress, missing.get(name))
            if main:
                scores["tasks"].update(entries)
                (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        failed = [f"{t}: {e['error']}" for t, e in scores["tasks"].items() if e["status"] != "ok"]
        if failed:
            raise TasksFailed("; ".join(failed))
    dist.barrier()
    dist.teardown()
    return scores


def precision_of(bf16) -> str:
    """"bf16" or "float32": what the model will run in on this process's device, or BadInput for a bad setting."""
    import torch

    from ov2.config import ConfigError
    from ov2.precision import resolve_bf16

    try:
        use, _ = resolve_bf16(bf16, "cuda" if torch.cuda.is_available() else "cpu")
    except ConfigError as err:
        raise BadInput(f"--bf16: {err}") from None
    return "bf16" if use else "float32"


def task_manager_for(include: tuple = (), defaults: bool = True):
    """lmms-eval's TaskManager over its tasks (unless `defaults` is false), ours (TASKS_DIR) and `include`, except
    that a likelihood-scored task (output_type multiple_choice) stays a plain task: lmms-eval 0.7 builds every task
    of a chat model such as llava_hf as a messages task, which only generates ("Currently messages is used for
    generation only")."""
    from lmms_eval.api.task import ConfigurableMessagesTask, ConfigurableTask
    from lmms_eval.tasks import TaskManager

    def plain_choices(loaded: dict) -> None:  # a group's value is a dict of its tasks
        for task in loaded.values():
            if isinstance(task, dict):
                plain_choices(task)
            elif isinstance(task, ConfigurableMessagesTask) and task.OUTPUT_TYPE == "multiple_choice":
                task.__class__ = ConfigurableTask  # its parent class: the messages class only adds methods

    class Tasks(TaskManager):
        def load_task_or_group(self, task_list=None, task_type="simple") -> dict:
            loaded = super().load_task_or_group(task_list, task_type)
            plain_choices(loaded)
            return loaded

    return Tasks("ERROR", include_path=[str(TASKS_DIR), *include], include_defaults=defaults, model_name="llava_hf")


def _build_data(tasks: list[str], data_dir: Path) -> dict[str, str]:
    """Build the built-in tasks' missing data -> {task: why it could not be built}."""
    from benchmarks.evals.suite.build import build_task, has_data

    errors = {}
    for name in tasks:
        if name in TASKS and not has_data(data_dir / name):
            try:
                build_task(name, data_dir / name)
            except (FileNotFoundError, OSError) as err:
                errors[name] = f"data missing: {data_dir / name} could not be built: {err}"
    return errors


def _one(lm, name: str, data_dir: Path, out: Path, limit, task_manager, progress: bool,
         missing: str | None = None) -> dict | None:
    """One task's (or group's) scores.json entries, {task: entry} (None on a torchrun rank other than 0)."""
    from benchmarks.evals.suite.build import has_data
    from ov2 import distributed as dist

    start = time.time()
    spec = TASKS.get(name)
    try:
        if spec is not None and not has_data(data_dir / name):  # the same answer on every rank
            raise RuntimeError(missing or f"data missing: {data_dir / name} could not be built")
        results = run_task(lm, name, data_dir, out, limit, task_manager)
        if results is None:
            return None
        entries = {task: {"status": "ok", "error": None, **result} for task, result in results.items()}
    except Exception as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        entries = {name: {"status": "failed", "error": line, "primary": spec.primary if spec else None,
                          "metrics": {}, "n": 0, "chance": spec.chance if spec else None}}
    if not dist.is_main():
        return None
    wall = round(time.time() - start, 2)
    for task, entry in entries.items():
        entry["wall_s"] = wall  # a group's tasks ran in one call
        if not progress:
            continue
        if entry["status"] == "ok":
            m = entry["metrics"].get(entry["primary"], {})
            print(f"{task}: {entry['primary']} {m.get('value')} (n={entry['n']}, {wall} s)", file=sys.stderr)
        else:
            print(f"{task}: failed: {entry['error']}", file=sys.stderr)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("model", help="a LLaVA folder (config.json + weights + processor files)")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated; built-in: {','.join(TASKS)}; or lmms-eval task names")
    parser.add_argument("--out", required=True, help="output folder (scores.json, samples/, lmms_eval/)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions per task")
    parser.add_argument("--data", default=None, help="built-in task data folder (default OUT/data; built if missing)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="questions per forward pass / generate call (default 8; the answers do not depend on it)")
    parser.add_argument("--bf16", default="auto", help="auto (bf16 where the device multiplies it natively, as "
                        "training), true or false (float32)")
    parser.add_argument("--include", action="append", default=[], metavar="DIR",
                        help="a folder of your own lmms-eval task YAMLs (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace earlier results in OUT")
    args = parser.parse_args(argv)
    from ov2.runfolder import RunLocked

    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        scores = evaluate(args.model, tasks, args.out, args.limit, args.data, args.batch_size, args.force,
                          include=tuple(args.include), bf16=args.bf16)
    except (BadInput, RunLocked) as err:
        return fail(PROG, err, 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command with --force to evaluate again ({args.out})",
              file=sys.stderr)
        return 130
    except Exception as err:  # the model could not be loaded, or lmms-eval broke outside a task
        return fail(PROG, f"failed: {str(err).strip() or type(err).__name__}", 1)  # fail() keeps the first line
    failed = [f"{t}: {e['error']}" for t, e in scores["tasks"].items() if e["status"] != "ok"]
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds the scores
        return 1 if failed else 0
    print(json.dumps({t: e["metrics"].get(e["primary"], {}).get("value") for t, e in scores["tasks"].items()}))
    if failed:  # the last line a caller (the runner) reads
        return fail(PROG, f"{len(failed)} of {len(scores['tasks'])} tasks failed: {'; '.join(failed)}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
