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


def test_the_papers_llava15_experiment_plans_every_stage_with_the_papers_settings(tmp_path):
    """benchmarks/runner/experiments/llava15_paper.yaml, its /data paths pointed at folders of the right kind."""
    text = open(os.path.join(ROOT, "benchmarks/runner/experiments/llava15_paper.yaml")).read()
    data = tmp_path / "data"
    tree = yaml.safe_load(text.replace("/data/", f"{data}/"))
    for spec in tree["encoders"].values():
        (kind, folder), = spec.items()
        Path(folder).mkdir(parents=True)
        (Path(folder) / ("open_clip_config.json" if kind == "openvision" else "config.json")).write_text("{}")
    Path(tree["bridge"]["llm"]).mkdir(parents=True)
    (Path(tree["bridge"]["llm"]) / "config.json").write_text("{}")
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    res = run_inprocess("run", str(tmp_path / "paper.yaml"), "--out", str(tmp_path / "run"), "--dry-run")
    assert res.returncode == 0, res.stderr
    plan = res.stdout
    for name in tree["encoders"]:
        assert f"{name}/bridge" in plan and f"{name}/eval" in plan and f"{name}/pretrain" not in plan
    for setting in ("--stage1.steps=2181", "--stage1.batch_size=256", "--stage1.lr=0.001", "--stage2.steps=5198",
                    "--stage2.batch_size=128", "--stage2.lr=2e-05", "--stage1.warmup_ratio=0.03",
                    "--chat_template=auto", "--pad_to_square=true", "--feature_layer=-2", "--nproc_per_node=8",
                    "--stage2.fsdp=true", "--stage2.gradient_checkpointing=true",
                    f"--stage2_data={data}/llava/llava_v1_5_mix665k.json",
                    f"--stage1_image_root={data}/llava/LLaVA-Pretrain/images",
                    "textvqa_val,chartqa,ocrbench,mme,seedbench,scienceqa_img,gqa,pope"):
        assert setting in plan, setting
    assert "blind" not in plan and "random-init" not in plan
    hub = yaml.safe_load((tmp_path / "paper.yaml").read_text())
    hub["bridge"]["llm"] = "lmsys/vicuna-7b-v1.5"  # a Hub id plans as well (from_pretrained resolves it)
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(hub, sort_keys=False))
    res = run_inprocess("run", str(tmp_path / "hub.yaml"), "--out", str(tmp_path / "run"), "--dry-run")
    assert res.returncode == 0 and "--llm lmsys/vicuna-7b-v1.5" in res.stdout, res.stderr
