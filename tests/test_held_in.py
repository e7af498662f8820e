"""Held-in and held-out tasks (LLaVA-1.5's split): a held-in task's train split is in the bridge's stage-2 mix and
its test split is not; its test scenes are drawn like the training scenes, a held-out task's only from combinations
no training set holds."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from benchmarks.evals.suite.build import generate
from benchmarks.evals.suite.tasks import TASKS
from encoder.data.synth import is_heldout, make_scene

HELD_IN = [n for n, t in TASKS.items() if not t.heldout]
SCENE_KIND = {"ov2_textvqa": "text", "ov2_ocrbench": "text", "ov2_chartqa": "chart", "ov2_sqa": "chart"}


def _digest(rows: list[dict]) -> set[str]:
    return {hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest() for r in rows}


def test_the_shape_and_fashion_tasks_are_held_in_and_unseen_pairs_stay_held_out():
    assert set(HELD_IN) == {"ov2_gqa", "ov2_pope", "ov2_mme", "ov2_seed", "ov2_fashion"}
    assert TASKS["ov2_gqa_unseen"].heldout and TASKS["ov2_gqa_unseen"].generator == "ov2_gqa"


@pytest.mark.parametrize("name", [n for n in TASKS if n != "ov2_fashion"])
def test_test_scenes_are_training_like_or_unseen_as_the_task_says(name):
    spec = TASKS[name]
    kind = SCENE_KIND.get(name, "shapes")
    rows = generate(name, n=40)
    held = [is_heldout(make_scene(spec.seed, r["image_id"], size=64, kinds=(kind,))) for r in rows]
    assert held == [spec.heldout] * len(rows), name


@pytest.mark.parametrize("name", HELD_IN)
def test_a_held_in_task_has_a_train_split_like_its_test_split_and_disjoint_from_it(name):
    test, train = generate(name, n=60), generate(name, n=200, split="train")
    assert not _digest(test) & _digest(train)  # no test image is a train-split image
    assert {r["type"] for r in train} == {r["type"] for r in test}  # the same kinds of question ...
    assert set(Counter(r["answer"] for r in train)) >= set(Counter(r["answer"] for r in test))  # ... and answers
    if name == "ov2_fashion":  # real images: the train split reads Fashion-MNIST's train images and labels
        from encoder.data.fashion_mnist import CLASSES, load_split, to_image

        images, labels = load_split("train")
        for r in train[:10]:
            assert _digest([r]) == _digest([{"image": to_image(images[r["image_id"]], 64)}])
            option = next(line for line in r["question"].splitlines() if line.startswith(r["answer"] + ". "))
            assert option[3:] == CLASSES[int(labels[r["image_id"]])]
    with pytest.raises(ValueError, match="split must be test or train"):
        generate(name, n=2, split="val")


def test_stage2_mix_holds_train_splits_and_never_a_test_question():
    from bridge.data import SynthInstructions, TaskMix

    base = SynthInstructions(400, kinds=("shapes", "fashion"))
    mix = TaskMix(base, ("ov2_gqa", "ov2_pope"), share=0.5, per_task=64)
    records = [mix[i] for i in range(400)]
    from_tasks = [r for r in records if r["id"].startswith("ov2_")]
    assert 0.4 < len(from_tasks) / len(records) < 0.6  # the share
    assert {r["type"] for r in from_tasks} == {"ov2_gqa", "ov2_pope"}
    gqa = next(r for r in from_tasks if r["type"] == "ov2_gqa")
    human = gqa["conversations"][0]["value"]
    assert human.startswith("<image>\n") and human.endswith(TASKS["ov2_gqa"].suffix)  # the task's own prompt
    again = TaskMix(base, ("ov2_gqa", "ov2_pope"), share=0.5, per_task=64)
    assert [again[i]["id"] for i in range(50)] == [r["id"] for r in records[:50]]  # a pure function of the index
    test_images = _digest(generate("ov2_gqa", n=210)) | _digest(generate("ov2_pope", n=210))
    assert not _digest(records) & test_images
    assert TaskMix(base, (), share=0.5)[3]["id"] == base[3]["id"]  # no tasks: the base set


def test_bridge_config_names_bad_stage2_tasks():
    from bridge.config import BridgeConfig, validate
    from ov2.config import ConfigError

    with pytest.raises(ConfigError, match="stage2_tasks: unknown built-in tasks"):
        validate(BridgeConfig(encoder="preset:ov2-micro", out="x", stage2_tasks="ov2_gqa,ov2_nope"))
    with pytest.raises(ConfigError, match="no train split"):
        validate(BridgeConfig(encoder="preset:ov2-micro", out="x", stage2_tasks="ov2_gqa_unseen"))
    with pytest.raises(ConfigError, match="stage2_task_share"):
        validate(BridgeConfig(encoder="preset:ov2-micro", out="x", stage2_tasks="ov2_gqa", stage2_task_share=1.5))
