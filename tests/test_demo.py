"""The README's main command as CI can afford it: the default experiment with --quick, end to end (three encoders
pretrained, bridged to SmolLM2-135M, evaluated through lmms-eval on the whole suite and on Fashion-MNIST, results
table, HTML report)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from benchmarks.runner.experiment import SUITE_TASKS
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

DEFAULT = os.path.join(ROOT, "benchmarks", "runner", "experiments", "default.yaml")
ENCODERS = ("openvision2", "openvision", "clip")


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
    for control in ("blind", "random-init"):  # the controls, bridged and evaluated as the encoders are
        rows = primary[primary["encoder"] == control]
        assert set(rows["role"]) == {"control"} and set(SUITE_TASKS) <= set(rows["task"]), (control, set(rows["task"]))
    assert set(table.loc[table["encoder"].isin(ENCODERS), "role"]) == {"encoder"}
    assert primary["chance"].notna().all() and primary["value"].notna().all()
    html = (out / "report" / "index.html").read_text()
    assert "openvision2" in html and "OCRBench" in html and 'id="controls-table"' in html
    assert "openvision2" in res.stdout and "(chance)" in res.stdout  # the encoder x task table is printed
