"""`ov2 eval` through lmms-eval's own llava_hf (real lmms-eval, a tiny exported LLaVA): files written, lmms-eval's
logged answers equal our direct generation path (open answers) and the option a direct forward pass finds likeliest
(fixed options, scored by likelihood), a task without data fails alone, bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bridge_helpers import write_tiny_llava

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

LIMIT = 4


def test_lmms_eval_installed_and_importable():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--help"], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval" in proc.stdout
    from lmms_eval.evaluator import simple_evaluate

    assert callable(simple_evaluate)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One `ov2 eval` call: a generated-answer task (gqa), two likelihood-scored ones (pope: Yes/No, seed: letters)
    and one whose data is missing (built-in data folder left empty)."""
    from benchmarks.evals.evaluate import main

    root = tmp_path_factory.mktemp("eval")
    model, processor = write_tiny_llava(root / "model")
    (root / "data" / "ov2_sqa" / "test").mkdir(parents=True)  # looks like a data folder, holds nothing
    (root / "data" / "ov2_sqa" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    code = main([str(root / "model"), "--tasks", "ov2_gqa,ov2_sqa,ov2_pope,ov2_seed", "--limit", str(LIMIT),
                 "--out", str(root / "out"), "--data", str(root / "data")])
    return root, code


def test_eval_writes_scores_samples_and_lmms_eval_files(evaluated, capsys):
    root, code = evaluated
    out = root / "out"
    assert code == 1  # one task failed
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["tasks"]) == ["ov2_gqa", "ov2_sqa", "ov2_pope", "ov2_seed"]
    for name, primary, chance in (("ov2_gqa", "exact_match", 0.1454), ("ov2_pope", "f1", 0.5),
                                  ("ov2_seed", "accuracy", 0.25)):
        entry = scores["tasks"][name]
        assert entry["status"] == "ok" and entry["error"] is None and entry["n"] == LIMIT and entry["empty"] == 0
        assert entry["primary"] == primary and entry["chance"] == pytest.approx(chance, abs=1e-3)
        assert entry["wall_s"] > 0
        assert all(0.0 <= m["value"] <= 1.0 for m in entry["metrics"].values()), entry["metrics"]
        lines = [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert [x["doc_id"] for x in lines] == list(range(LIMIT))
        assert all(set(x) == {"doc_id", "question", "target", "prediction", "score", "type"} for x in lines)
        assert all(x["score"] in (0.0, 1.0) and x["prediction"] for x in lines)
        suffix = "Answer with the option's letter from the given choices directly." if name == "ov2_seed" else \
            "?\nAnswer the question using a single word or phrase."
        assert all(x["question"].endswith(suffix) for x in lines)
        if name != "ov2_gqa":  # scored by likelihood: the answer is one of the question's options
            options = (lambda q: ["Yes", "No"]) if name == "ov2_pope" else choice_letters
            assert all(x["prediction"] in options(x["question"]) for x in lines), lines
            assert all(x["score"] == float(x["prediction"] == x["target"]) for x in lines)
        assert (out / "lmms_eval" / f"{name}_results.json").is_file()
        assert (out / "lmms_eval" / f"{name}_samples_{name}.jsonl").is_file()
    assert "acc_colour" in scores["tasks"]["ov2_gqa"]["metrics"]
    assert {"accuracy", "yes_ratio", "precision", "recall"} <= set(scores["tasks"]["ov2_pope"]["metrics"])
    failed = scores["tasks"]["ov2_sqa"]
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert "data missing" in failed["error"] and "ov2_sqa" in failed["error"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("ov2_sqa: data missing")
    assert len(list((root / "data" / "ov2_gqa").rglob("*.arrow"))) == 1  # built on demand


def choice_letters(question: str) -> list[str]:
    return [line[0] for line in question.splitlines() if len(line) > 2 and line[0] in "ABCDE" and line[1:3] == ". "]


def test_lmms_eval_answers_equal_bridge_answer(evaluated):
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from benchmarks.evals.suite.tasks import TASKS
    from bridge.evaluate import answer

    root, _ = evaluated
    model = LlavaForConditionalGeneration.from_pretrained(root / "model").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    logged = [json.loads(x) for x in
              (root / "out" / "lmms_eval" / "ov2_gqa_samples_ov2_gqa.jsonl").read_text().splitlines()]
    data = datasets.load_from_disk(str(root / "data" / "ov2_gqa"))["test"]
    for sample in logged:
        doc = data[sample["doc_id"]]
        prompt = doc["question"] + TASKS["ov2_gqa"].suffix
        assert sample["input"] == prompt
        image = doc["image"].convert("RGB")
        ours = answer(model, processor, [image], [prompt], max_new_tokens=8)[0]  # the YAMLs' max_new_tokens
        assert sample["filtered_resps"].strip() == ours
    assert len(logged) == LIMIT


@pytest.mark.parametrize("name", ["ov2_pope", "ov2_seed"])
def test_likelihood_scoring_picks_the_likeliest_option(evaluated, name):
    """The chosen option is the one with the highest model likelihood: lmms-eval's logged (nll, is_greedy) per option
    equal -log P(option | prompt, image) from one direct forward pass on the generation prompt (bridge.evaluate's,
    the prompt `ov2 eval` generates after), and the sample's prediction is its argmax."""
    import ast

    import datasets
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from benchmarks.evals.suite.tasks import TASKS

    root, _ = evaluated
    model = LlavaForConditionalGeneration.from_pretrained(root / "model").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    data = datasets.load_from_disk(str(root / "data" / name))["test"]
    logged = [json.loads(x) for x in (root / "out" / "lmms_eval" / f"{name}_samples_{name}.jsonl").read_text()
              .splitlines()]
    ours = {json.loads(x)["doc_id"]: json.loads(x) for x in (root / "out" / "samples" / f"{name}.jsonl").read_text()
            .splitlines()}
    assert len(logged) == LIMIT
    for sample in logged:
        doc = data[sample["doc_id"]]
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": doc["question"] + TASKS[name].suffix}]}],
            add_generation_prompt=True)
        options = ["Yes", "No"] if name == "ov2_pope" else choice_letters(doc["question"])
        ids = [processor.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        assert all(len(i) == 1 for i in ids)  # one token each: the next-token distribution scores them all
        with torch.no_grad():
            inputs = processor(images=[doc["image"].convert("RGB")], text=text, return_tensors="pt")
            logp = model(**inputs).logits[0, -1].float().log_softmax(-1)
        direct = [float(logp[i[0]]) for i in ids]
        nll = [ast.literal_eval(r)[0] for r in sample["filtered_resps"]]
        assert nll == pytest.approx([-x for x in direct], rel=1e-4, abs=1e-4 * max(map(abs, direct)))
        assert ours[sample["doc_id"]]["prediction"] == options[direct.index(max(direct))]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from benchmarks.evals.evaluate import main

    assert main([str(tmp_path / "nope"), "--tasks", "ov2_gqa", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json" in err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    assert main([str(tmp_path / "m"), "--tasks", "ov2_gqa", "--out", str(tmp_path / "o")]) == 2
    assert "llava" in capsys.readouterr().err
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    assert main([str(tmp_path / "m"), "--tasks", "ov2_gqa", "--limit", "0", "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "scores.json").write_text("{}")
    assert main([str(tmp_path / "m"), "--tasks", "ov2_gqa", "--out", str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "o" / "scores.json").read_text() == "{}"  # untouched


def test_image_token_mismatch_fails_the_task(evaluated, tmp_path):
    """A processor whose image-token count does not match the model: the task fails with transformers' own line
    (lmms-eval's batch-1 loop logged it as an ERROR and answered ""; ours raises), the other outputs stay."""
    import shutil

    from benchmarks.evals.evaluate import evaluate

    root, _ = evaluated
    broken = tmp_path / "broken"
    shutil.copytree(root / "model", broken)
    config = json.loads((broken / "processor_config.json").read_text())
    config["num_additional_image_tokens"] = 0  # one image token fewer than the tower's features
    (broken / "processor_config.json").write_text(json.dumps(config))
    scores = evaluate(broken, ["ov2_gqa"], tmp_path / "out", limit=2, data_dir=root / "data", progress=False)
    entry = scores["tasks"]["ov2_gqa"]
    assert entry["status"] == "failed" and "image tokens do not match" in entry["error"], entry["error"]
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "failed"


def test_an_empty_answer_is_a_wrong_answer_not_a_failed_task():
    from benchmarks.evals.evaluate import check_answers
    from benchmarks.evals.suite import metrics
    from benchmarks.runner.results import _eval_rows

    lines = [{"prediction": ""}, {"prediction": "  "}, {"prediction": "red"}, {"prediction": "no"}]
    assert check_answers(lines, errors=[]) == 2  # counted, not raised: a weak model's silence is a result
    for match, target in (("vqa", "red"), ("relaxed", "3"), ("ocr", "cat"), ("letter", "A"), ("yesno", "no")):
        assert metrics.sample_record(match, "", target)["score"] == 0.0  # and scored 0 by every matcher
    with pytest.raises(RuntimeError, match="lmms-eval logged an ERROR: boom"):
        check_answers(lines, errors=["boom"])
    with pytest.raises(RuntimeError, match="no answers"):
        check_answers([], errors=[])
    scores = {"tasks": {"ov2_gqa": {"status": "ok", "primary": "exact_match", "n": 4, "empty": 2, "chance": 0.1,
                                    "metrics": {"exact_match": {"value": 0.25, "stderr": 0.2}}}}}
    empty = [r for r in _eval_rows(scores) if r["metric"] == "empty_answers"]
    assert empty == [{"task": "ov2_gqa", "metric": "empty_answers", "value": 0.5, "stderr": pytest.approx(float("nan"),
                      nan_ok=True), "n": 4, "chance": pytest.approx(float("nan"), nan_ok=True), "primary": False}]


def test_one_pass_option_scores_equal_one_pass_per_option(evaluated):
    """options_nll: one-token options from the prompt's one forward pass, longer ones from their own; each equal to
    option_nll's pass over prompt + option (the same numbers, to float tolerance scaled to their size)."""
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from benchmarks.evals.adapter import chat_prompt, option_nll, options_nll

    root, _ = evaluated
    model = LlavaForConditionalGeneration.from_pretrained(root / "model").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    doc = datasets.load_from_disk(str(root / "data" / "ov2_seed"))["test"][0]
    prompt = chat_prompt(processor, doc["question"], 1)
    images = [doc["image"].convert("RGB")]
    options = ["A", "B", "Yes", "a blue circle"]
    fast = options_nll(model, processor, prompt, options, images)
    slow = [option_nll(model, processor, prompt, o, images) for o in options]
    scale = max(abs(n) for n, _ in slow)
    assert [n for n, _ in fast] == pytest.approx([n for n, _ in slow], abs=1e-4 * scale)
    assert [g for _, g in fast] == [g for _, g in slow]


def _tiny_questions(root, task: str, n: int):
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from benchmarks.evals.adapter import chat_prompt

    model = LlavaForConditionalGeneration.from_pretrained(root / "model").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    docs = datasets.load_from_disk(str(root / "data" / task))["test"].select(range(n))
    prompts = [chat_prompt(processor, d["question"] + ("?" * i), 1) for i, d in enumerate(docs)]  # lengths differ
    return model, processor, prompts, [[d["image"].convert("RGB")] for d in docs]


def test_batched_option_scores_equal_batch_one(evaluated):
    """score_options over a batch of questions of different lengths (one padded forward pass, the LM head at each
    prompt's last position) gives each question the numbers it gets alone."""
    from benchmarks.evals.adapter import score_options

    root, _ = evaluated
    model, processor, prompts, images = _tiny_questions(root, "ov2_seed", LIMIT)
    questions = [(p, ["A", "B", "C", "D", "a blue circle"], ims) for p, ims in zip(prompts, images)]
    together = score_options(model, processor, questions)
    alone = [score_options(model, processor, [q])[0] for q in questions]
    scale = max(abs(n) for row in alone for n, _ in row)
    for batched, single in zip(together, alone):
        assert [n for n, _ in batched] == pytest.approx([n for n, _ in single], abs=1e-4 * scale)
        assert [g for _, g in batched] == [g for _, g in single]


def test_batched_generation_equals_batch_one(evaluated):
    """generate over a left-padded batch of prompts of different lengths gives each prompt its batch-1 tokens."""
    from benchmarks.evals.adapter import generate

    root, _ = evaluated
    model, processor, prompts, images = _tiny_questions(root, "ov2_gqa", LIMIT)
    eos = processor.tokenizer.eos_token_id
    together = generate(model, processor, prompts, images, max_new_tokens=6, eos_token_id=eos)
    alone = [generate(model, processor, [p], [ims], max_new_tokens=6, eos_token_id=eos)[0]
             for p, ims in zip(prompts, images)]
    assert together == alone and all(len(ids) >= 1 for ids in alone)


def test_bf16_evaluation_equals_float32_within_tolerance(evaluated):
    """The same tiny model in bf16 scores every option within bf16's precision of float32 and picks the same
    option wherever float32's choice is not a near tie."""
    import torch

    from benchmarks.evals.adapter import score_options

    root, _ = evaluated
    model, processor, prompts, images = _tiny_questions(root, "ov2_seed", LIMIT)
    questions = [(p, ["A", "B", "C", "D"], ims) for p, ims in zip(prompts, images)]
    full = score_options(model, processor, questions)
    half = score_options(model.to(torch.bfloat16), processor, questions)
    scale = max(abs(n) for row in full for n, _ in row)
    for f, h in zip(full, half):
        f_nll, h_nll = [n for n, _ in f], [n for n, _ in h]
        assert h_nll == pytest.approx(f_nll, abs=0.02 * scale)
        best, second = sorted(f_nll)[:2]
        if second - best > 0.04 * scale:
            assert h_nll.index(min(h_nll)) == f_nll.index(best)


def test_a_group_is_reported_per_subtask(evaluated, tmp_path):
    """An lmms-eval group (here a user's, from --include: two built-in tasks under other names) gets one entry per
    subtask, each equal to the same task evaluated alone, and one for the group's own aggregate (lmms-eval's)."""
    from benchmarks.evals.evaluate import TASKS_DIR, main

    root, _ = evaluated
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("_default_template_ov2_mc_yaml", "utils.py"):
        (tasks / name).write_text((TASKS_DIR / name).read_text())
    for name in ("ov2_pope", "ov2_seed"):
        text = (TASKS_DIR / f"{name}.yaml").read_text().replace(f"task: {name}", f"task: mine_{name[4:]}")
        text = text.replace(f"dataset_path: ov2_data/{name}", f"dataset_path: {root / 'data' / name}")
        (tasks / f"mine_{name[4:]}.yaml").write_text(text)
    (tasks / "mine.yaml").write_text("group: mine\ntask: [mine_pope, mine_seed]\naggregate_metric_list:\n"
                                     "  - metric: accuracy\n    aggregation: mean\n    weight_by_size: true\n")
    out = tmp_path / "out"
    assert main([str(root / "model"), "--tasks", "mine", "--include", str(tasks), "--limit", str(LIMIT),
                 "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())["tasks"]
    assert set(scores) == {"mine", "mine_pope", "mine_seed"}
    alone = json.loads((root / "out" / "scores.json").read_text())["tasks"]
    for name in ("pope", "seed"):
        entry = scores[f"mine_{name}"]
        assert entry["status"] == "ok" and entry["group"] == "mine" and entry["n"] == LIMIT
        assert entry["metrics"]["accuracy"]["value"] == alone[f"ov2_{name}"]["metrics"]["accuracy"]["value"]
        same = [json.loads(x)["prediction"] for x in (out / "samples" / f"mine_{name}.jsonl").read_text().splitlines()]
        assert same == [json.loads(x)["prediction"]
                        for x in (root / "out" / "samples" / f"ov2_{name}.jsonl").read_text().splitlines()]
    group = scores["mine"]
    assert group["subtasks"] == ["mine_pope", "mine_seed"] and group["n"] == 2 * LIMIT
    own = json.loads((out / "lmms_eval" / "mine_results.json").read_text())["results"]["mine"]["accuracy,none"]
    assert group["metrics"]["accuracy"]["value"] == own  # lmms-eval's weighting, as lmms-eval reports it
    assert main([str(root / "model"), "--tasks", "mine", "--include", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o2")]) == 2
