"""Presets, overrides and validation: paper sizes, bad values exit 2 with one clear line."""

import pytest
import torch

from encoder.config import ConfigError, apply_overrides, apply_yaml, get_preset, validate
from encoder.models import build_model
from tests.helpers import run_inprocess


@pytest.mark.parametrize("preset,vit_m", [("ov2-l14", 304), ("ov2-so400m14", 412), ("ov2-h14", 632), ("ov2-g14", 1010)])
def test_paper_vit_sizes(preset, vit_m):
    cfg = validate(get_preset(preset))
    with torch.device("meta"):
        model = build_model(cfg.model)
    count = sum(p.numel() for p in model.vit.parameters()) / 1e6
    assert abs(count - vit_m) / vit_m < 0.01, (preset, count)


def test_l_decoder_is_about_135m():
    with torch.device("meta"):
        model = build_model(get_preset("ov2-l14").model)
    count = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    assert abs(count - 135) / 135 < 0.02, count


def test_stage_schedule_is_low_then_high_resolution():
    for name in ("ov2-l14", "ov2-h14", "ov2-so400m14", "ov2-tiny"):
        cfg = get_preset(name)
        sizes = [s.image_size for s in cfg.stages]
        assert len(sizes) == (3 if name == "ov2-so400m14" else 2) and sizes == sorted(set(sizes))
    paper = get_preset("ov2-l14")
    assert (paper.stages[0].image_size, paper.stages[1].image_size) == (84, 224)
    assert paper.stages[0].batch_size * paper.stages[0].steps == 12_800_000_000
    assert paper.stages[0].lr == pytest.approx(1.024e-3) and paper.stages[1].lr == pytest.approx(2.56e-5)


def test_overrides_by_path_and_unique_leaf(tmp_path):
    cfg = apply_overrides(get_preset("ov2-tiny"), ["--keep_ratio=0.25", "--stages.1.steps=7", "--bf16=true"])
    assert cfg.model.keep_ratio == 0.25 and cfg.stages[1].steps == 7 and cfg.bf16 == "true"
    with pytest.raises(ConfigError, match="ambiguous"):
        apply_overrides(cfg, ["--steps=3"])
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  decoder:\n    mask: causal\nstages:\n  - {steps: 5}\n")
    cfg = apply_yaml(get_preset("ov2-tiny"), str(path))
    assert cfg.model.decoder.mask == "causal" and [s.steps for s in cfg.stages] == [5]


@pytest.mark.parametrize("override,message", [
    ("--nope=1", "unknown config key 'nope'"),
    ("--stages.1.image_size=60", "not divisible by the patch size 8"),
    ("--keep_ratio=0", "keep_ratio must be in (0, 1]"),
    ("--keep_ratio=1.5", "keep_ratio must be in (0, 1]"),
    ("--seed=abc", "seed: expected int"),
    ("--max_grad_norm=-1", "max_grad_norm must be 0 (off) or a positive norm, got -1.0"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, override, message):
    result = run_inprocess("train", "--preset", "ov2-tiny", "--out", str(tmp_path / "run"), override, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_unknown_preset_and_unbuilt_command(cli, tmp_path):
    result = cli("train", "--preset", "ov2-xl", "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2 and "unknown preset 'ov2-xl'" in result.stderr
    result = cli("nonsense")
    assert result.returncode == 2 and "unknown command" in result.stderr
