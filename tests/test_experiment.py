"""Experiment files through the one config engine: `ov2 run EXP --dry-run` refuses a bad override (pretrain,
an encoder's, the bridge's) with one line naming it and exit 2, before anything is created; the default plans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from benchmarks.runner.experiment import EncoderSpec, Experiment, ExperimentError, from_dict, to_dict
from ov2.config import ConfigError, build, flatten
from tests.helpers import ROOT, run_inprocess

DEFAULT = os.path.join(ROOT, "benchmarks/runner/experiments/default.yaml")


def dry_run(tmp_path: Path, extra: dict) -> tuple[int, str]:
    tree = {"name": "t", "encoders": {"a": {"preset": "ov2-micro"}}, **extra}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tree))
    res = run_inprocess("run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "run"), "--dry-run")
    return res.returncode, res.stderr.strip()


@pytest.mark.parametrize("extra, message", [
    ({"pretrain": {"model": {"vit": {"widht": 64}}}}, "pretrain: unknown config key 'model.vit.widht'"),
    ({"encoders": {"a": {"preset": "ov2-micro", "overrides": {"stages.0.stepz": 3}}}},
     "encoders.a.overrides: unknown config key 'stages.0.stepz'"),
    ({"bridge": {"overrides": {"stage2.lrr": 1e-4}}}, "bridge.overrides: unknown config key 'stage2.lrr'"),
    ({"bridge": {"overrides": {"stage2.lr": -1}}}, "bridge.overrides: stage2.lr"),
    ({"bridge": {"overrides": {"stage1": {"steps": "many"}}}}, "bridge.overrides: stage1.steps: expected int"),
    ({"pretrain": {"model.vit.patch_size": 0}}, "model.vit.patch_size must be positive"),
    ({"encoders": {"a": {"preset": "ov2-huge"}}}, "encoders.a.preset: unknown preset 'ov2-huge'"),
    ({"bridge": {"overrides": {"llm": "other"}}}, "bridge.overrides: llm: set by the runner"),
    ({"pretrain": {"seed": 3}}, "pretrain: seed: set by the runner"),
    ({"pretrain": {"stages": [{"steps": 3}]}}, "pretrain: stages: give list items one by one"),
    ({"quick": {"bridge": {"overrides": {"stage2.lrr": 1}}}}, None),  # not applied without --quick
])
def test_bad_override_fails_the_dry_run_naming_it(tmp_path, extra, message):
    code, err = dry_run(tmp_path, extra)
    if message is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ov2 run: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_default_experiment_plans(tmp_path):
    for quick in ((), ("--quick",)):
        res = run_inprocess("run", DEFAULT, "--out", str(tmp_path / "run"), "--dry-run", *quick)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "openvision2/pretrain" in res.stdout and "--stage2.lr=" in res.stdout
    assert not (tmp_path / "run").exists()


def test_experiment_is_built_by_the_config_engine():
    exp = from_dict({"encoders": {"a": {"preset": "ov2-micro", "label": "A"}, "b": {"checkpoint": "runs/x"}},
                     "seeds": [0, 1], "eval": {"limit": 5}})
    assert list(exp.encoders) == ["a", "b"] and isinstance(exp.encoders["b"], EncoderSpec)
    assert exp.encoders["a"].label == "A" and exp.encoders["b"].label == "b" and exp.encoders["b"].name == "b"
    from benchmarks.evals.suite.tasks import TASKS

    assert exp.eval.tasks == list(TASKS)  # the whole built-in suite by default
    assert from_dict(to_dict(exp)) == exp  # RUN/experiment.yaml reads back as the same experiment
    assert issubclass(ExperimentError, ConfigError)
    with pytest.raises(ExperimentError, match=r"^encoders\.a\.overrides: expected a mapping"):
        from_dict({"encoders": {"a": {"preset": "ov2-micro", "overrides": [1]}}})
    with pytest.raises(ConfigError, match=r"^bridge: unknown key 'lm'"):
        build(Experiment, {"bridge": {"lm": "x"}})
    with pytest.raises(ConfigError, match=r"^seeds\.1: expected int"):
        build(Experiment, {"seeds": [0, "one"]})


def test_flatten_nested_and_dotted_keys():
    assert flatten({"model": {"vit": {"width": 64}}, "stages.0.steps": 3, "data": {}}) == {
        "model.vit.width": 64, "stages.0.steps": 3}
    with pytest.raises(ConfigError, match="stages: give list items"):
        flatten({"stages": [{"steps": 3}]})
