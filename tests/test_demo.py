"""The README's main command as CI can afford it: the default experiment with --quick, end to end (three encoders
pretrained, bridged to SmolLM2-135M, evaluated through lmms-eval on the whole suite and on Fashion-MNIST, results
table, HTML report)."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from benchmarks.runner.experiment import SUITE_TASKS
from encoder.data.synth import COLOURS
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

DEFAULT = os.path.join(ROOT, "benchmarks", "experiments", "default.yaml")
ENCODERS = ("openvision2", "openvision", "clip")
# the suite's colour questions and a uniform guess's chance on each: open answer (one of the colours), yes/no,
# four lettered options
COLOUR_CHANCE = {"ov2_gqa": 1 / len(COLOURS), "ov2_mme": 0.5, "ov2_seed": 0.25}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    res = run_cli("run", DEFAULT, "--quick", "--out", str(out), timeout=3600)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res


def test_every_encoder_has_every_task_and_a_report(quick_run):
    out, res = quick_run
    table = pd.read_csv(out / "results.csv")
    primary = table[table["primary"]]
    for enc in ENCODERS:
        tasks = set(primary.loc[primary["encoder"] == enc, "task"])
        assert set(SUITE_TASKS) | {"fmnist_probe", "fmnist_zeroshot", "fmnist_probe_init"} <= tasks, (enc, tasks)
    assert primary["chance"].notna().all() and primary["value"].notna().all()
    html = (out / "report" / "index.html").read_text()
    assert "openvision2" in html and "OCRBench" in html
    assert "openvision2" in res.stdout and "(chance)" in res.stdout  # the encoder x task table is printed


def test_openvision2_answers_colour_questions_above_chance(quick_run):
    """Pooled over the tasks that ask colour questions: correct answers above a uniform guess's expectation by
    two binomial standard deviations."""
    out, _ = quick_run
    right, expected, variance, n = 0.0, 0.0, 0.0, 0
    for task, p in COLOUR_CHANCE.items():
        samples = out / "encoders" / "openvision2" / "eval" / "samples" / f"{task}.jsonl"
        scores = [r["score"] for r in map(json.loads, samples.read_text().splitlines()) if r["type"] == "colour"]
        right, n = right + sum(scores), n + len(scores)
        expected, variance = expected + p * len(scores), variance + p * (1 - p) * len(scores)
    print(f"openvision2 colour questions: {right:.0f}/{n} right, chance {expected:.1f} +- {math.sqrt(variance):.1f}")
    assert n >= 12, n
    assert right >= expected + 2 * math.sqrt(variance), (right, n, expected)
