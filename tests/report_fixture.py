"""A hand-made, realistic `ov2 run` folder for the report tests (no training: every file written directly).

    write_run(root, encoders=("ov2", "ov1", "clip"), failed=("clip", "bridge"), n=24) -> RUN

Per encoder: pretrain/ (metrics.jsonl with elapsed_s, config.yaml), export/, bridge/ (stage1 + stage2 metrics.jsonl
with cumulative seconds, summary.json), eval/ (scores.json, samples/<task>.jsonl for all nine built-in tasks),
encoder_eval/result.json; each with status.json. The `failed` stage gets state failed with an error line and the
stages after it that need it (export -> bridge -> eval) state skipped. RUN/results.csv is computed from the samples,
so the summary, the samples and the results agree as a real run's would. RUN/data/<task>/ holds small PIL images
(a DatasetDict with a test split, as the suite writes it; doc_id = row index) with question/answer columns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw

from benchmarks.evals.suite.tasks import TASKS as SUITE

# task -> (per-question types, answers to draw from)
_DRAWS = {
    "ov2_textvqa": (["word"], ["cat", "stop", "blue", "open", "exit"]),
    "ov2_chartqa": (["value", "compare"], ["3", "7", "12", "20"]),
    "ov2_ocrbench": (["text"], ["ov2", "hello", "42", "zebra"]),
    "ov2_mme": (["existence", "colour", "position", "count"], ["yes", "no"]),
    "ov2_seed": (["colour", "shape", "count"], ["A", "B", "C", "D"]),
    "ov2_sqa": (["pair", "largest"], ["A", "B", "C"]),
    "ov2_gqa": (["colour", "shape", "position"], ["red", "green", "left", "circle"]),
    "ov2_pope": (["random", "popular", "adversarial"], ["yes", "no"]),
    "ov2_fashion": (["clothing"], ["A", "B", "C", "D"]),
    "ov2_gqa_unseen": (["colour", "shape", "position"], ["red", "green", "left", "circle"]),
}
# task -> (primary metric, chance, per-question types, answers to draw from); metric and chance from the suite's table
TASKS = {task: (spec.primary, spec.chance, *_DRAWS[task]) for task, spec in SUITE.items()}
SKILL = {"ov2": 0.62, "ov1": 0.55, "clip": 0.45}
COLOURS = [(220, 60, 60), (60, 160, 80), (50, 90, 200), (230, 180, 40), (150, 70, 170)]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _status(folder: Path, state: str, error: str | None = None, wall: float = 1.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    status = {"state": state, "key": "0123456789abcdef", "error": error, "wall_s": wall, "peak_rss_mb": 812.5,
              "started": "2026-11-29T09:00:00+00:00", "finished": "2026-11-29T09:05:00+00:00"}
    (folder / "status.json").write_text(json.dumps(status))


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (48, 48), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    x, y = rng.integers(4, 24, size=2)
    colour = COLOURS[seed % len(COLOURS)]
    if seed % 2:
        draw.ellipse([x, y, x + 20, y + 20], fill=colour)
    else:
        draw.rectangle([x, y, x + 20, y + 20], fill=colour)
    return img


def _metrics(task: str, score: np.ndarray, targets: list[str], preds: list[str]) -> dict:
    """scores.json metrics of one task, computed from the per-question scores as evals/suite/metrics.py does."""
    n = len(score)
    sem = float(score.std(ddof=1) / np.sqrt(n))
    acc = {"value": float(score.mean()), "stderr": sem}
    if task == "ov2_mme":  # two questions per image; MME score = 100 * (acc + acc+)
        plus = float(np.mean([score[i] * score[i + 1] for i in range(0, n - 1, 2)]))
        return {"mme_score": {"value": 100.0 * (acc["value"] + plus), "stderr": 100.0 * 2 * sem},
                "acc": acc, "acc_plus": {"value": plus, "stderr": None}}
    if task == "ov2_ocrbench":
        return {"score_1000": {"value": 1000.0 * acc["value"], "stderr": 1000.0 * sem},
                "score": {"value": float(score.sum()), "stderr": None}, "accuracy": acc}
    if task == "ov2_pope":
        said = np.array([p == "yes" for p in preds])
        truth = np.array([t == "yes" for t in targets])
        tp = float((said & truth).sum())
        precision, recall = tp / max(said.sum(), 1), tp / max(truth.sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": {"value": f1, "stderr": None}, "accuracy": acc}
    return {TASKS[task][0]: acc}


def write_data(run: Path, n: int) -> dict:
    """RUN/data/<task>/ for every task; returns {task: (questions, answers, types)}."""
    from datasets import Dataset, DatasetDict

    truth = {}
    for t, (task, (_, _, types, answers)) in enumerate(TASKS.items()):
        questions = [f"Question {i} of {task}: what is shown?" for i in range(n)]
        if task == "ov2_textvqa":
            questions[0] = "Which tag is written: <b>bold</b> or <i>italic</i>?"
        truth[task] = (questions, [answers[(i * 7 + t) % len(answers)] for i in range(n)],
                       [types[i % len(types)] for i in range(n)])
        split = Dataset.from_dict({"id": list(range(n)), "image": [_image(i + 10 * t) for i in range(n)],
                                   "question": questions, "answer": truth[task][1], "type": truth[task][2]})
        DatasetDict({"test": split}).save_to_disk(str(run / "data" / task))  # as benchmarks/evals/suite/build.py
    return truth


def write_run(root: str | Path, encoders=("ov2", "ov1", "clip"), failed: tuple[str, str] | None = ("clip", "bridge"),
              n: int = 24, seed: int = 0, with_data: bool = True) -> Path:
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = write_data(run, n) if with_data else {
        task: ([f"q{i}" for i in range(n)], [a[i % len(a)] for i in range(n)], [ty[i % len(ty)] for i in range(n)])
        for task, (_, _, ty, a) in TASKS.items()}
    experiment = {"name": "default", "paper": "llava15_openvision2",
                  "encoders": {e: {"preset": f"{str(e).split('-')[0]}-tiny"} for e in encoders},
                  "bridge": {"recipe": "ov2-tiny", "llm": "smollm2-135m"}, "tasks": list(TASKS), "seeds": [seed]}
    (run / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    (run / "run.json").write_text(json.dumps({
        "experiment": "default", "argv": ["ov2", "run", "benchmarks/runner/experiments/default.yaml"],
        "started": "2026-11-29T09:00:00", "finished": "2026-11-29T10:12:00", "wall_s": 4320.0,
        "git_commit": "3070737abc", "versions": {"torch": "2.13.0", "transformers": "5.24.0", "lmms_eval": "0.7.3"},
        "machine": {"cpu": "x86_64", "cores": 2, "memory_gb": 24.0, "gpu": None, "python": "3.11.2"}}))
    rows = []
    order = ["pretrain", "export", "bridge", "eval"]
    for k, enc in enumerate(encoders):
        folder = run / "encoders" / re.sub(r"[^A-Za-z0-9._-]", "_", str(enc))  # reports.collect.encoder_dir
        fail_at = order.index(failed[1]) if failed and failed[0] == enc and failed[1] in order else None
        for i, stage in enumerate(order):
            if fail_at is None or i < fail_at:
                _status(folder / stage, "ok", wall=10.0 * (i + 1))
            elif i == fail_at:
                _status(folder / stage, "failed", error=f"RuntimeError: {stage} of {enc} ran out of memory at step 7")
                (folder / stage / "stage.log").write_text(f"$ ov2 {stage}\nstep 6 loss 3.2\nTraceback (most recent "
                                                          f"call last):\nRuntimeError: {stage} of {enc} ran out of "
                                                          "memory at step 7\n")
            else:
                _status(folder / stage, "skipped", error=f"needs {order[fail_at]}, which failed")
        for stage in order:
            (folder / stage / "stage.json").write_text(json.dumps({"stage": stage, "encoder": enc,
                                                                   "command": ["ov2", stage, "--out", str(folder)]}))
        skill = SKILL.get(str(enc).split("-")[0], 0.5)
        (folder / "pretrain" / "config.yaml").write_text(yaml.safe_dump({"preset": f"{enc}-tiny", "steps": 40}))
        _jsonl(folder / "pretrain" / "metrics.jsonl", [
            {"step": s, "stage": 1, "loss": 9.0 * np.exp(-s / (60 + 20 * k)) + 1.0, "elapsed_s": 0.9 * s * (1 + k / 4)}
            for s in range(10, 410, 10)])
        stages = ("stage1", "stage2") if fail_at is None or fail_at > 2 else ("stage1",)
        for j, st in enumerate(stages):
            steps = 30 if st == "stage1" else 80
            steps = 7 if fail_at == 2 else steps
            _jsonl(folder / "bridge" / st / "metrics.jsonl", [
                {"stage": j + 1, "step": s, "loss": 4.0 * np.exp(-s / (25 + 5 * j)) + 1.2 + 0.1 * k,
                 "elapsed_s": 1.1 * s}
                for s in range(1, steps + 1)])
        if fail_at is None:
            summary = {"stage1": {"steps": 30}, "stage2": {"steps": 80}}
            (folder / "bridge" / "summary.json").write_text(json.dumps(summary))
            tasks = {}
            for task, (metric, chance, _, answers) in TASKS.items():
                questions, targets, types = truth[task]
                correct = rng.random(n) < skill + (chance if chance <= 1 else 0.3) * 0.5
                preds = [t if c else answers[(answers.index(t) + 1) % len(answers)] for t, c in zip(targets, correct)]
                if task == "ov2_textvqa":  # an answer with markup, on a question where the encoders disagree
                    correct[0] = k != 0
                    preds[0] = targets[0] if k else "<img src=x onerror=alert(2)> <b>bold</b>"
                score = correct.astype(float)
                _jsonl(folder / "eval" / "samples" / f"{task}.jsonl", [
                    {"doc_id": i, "question": questions[i], "target": targets[i], "prediction": preds[i],
                     "score": score[i], "type": types[i]} for i in range(n)])
                metrics = _metrics(task, score, targets, preds)
                tasks[task] = {"status": "ok", "error": None, "primary": metric, "metrics": metrics, "n": n,
                               "chance": chance, "wall_s": 3.0}
                for name, m in metrics.items():  # as benchmarks/runner/results.py tabulates scores.json
                    rows.append({"experiment": "default", "encoder": enc, "task": task, "metric": name,
                                 "value": m["value"], "stderr": m["stderr"], "n": n,
                                 "chance": chance if name == metric else None, "seed": seed, "primary": name == metric})
            (folder / "eval" / "scores.json").write_text(json.dumps(
                {"model": str(folder / "bridge" / "model"), "data_dir": str(run / "data"), "tasks": tasks}))
        probe, zero, floor = 0.55 + 0.1 * skill, 0.2 + 0.2 * skill, 0.41
        _status(folder / "encoder_eval", "ok", wall=20.0)
        (folder / "encoder_eval" / "result.json").write_text(json.dumps({
            "family": str(enc), "linear_probe_acc": probe, "zero_shot_acc": zero,
            "random_init_linear_probe_acc": floor, "chance": 0.1, "n_train": 2000, "n_test": 1000,
            "zero_shot_method": "caption_likelihood" if str(enc).startswith("ov2") else "cosine"}))
        for task, value in (("fmnist_probe", probe), ("fmnist_zeroshot", zero), ("fmnist_probe_init", floor)):
            rows.append({"experiment": "default", "encoder": enc, "task": task, "metric": "accuracy", "value": value,
                         "stderr": float(np.sqrt(value * (1 - value) / 1000)), "n": 1000, "chance": 0.1, "seed": seed,
                         "primary": True})
    pd.DataFrame(rows).to_csv(run / "results.csv", index=False)
    return run
