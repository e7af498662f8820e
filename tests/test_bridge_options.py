"""`ov2 bench bridge-options`: the table of bridge options (full LLM vs LoRA, the tower's share) from one process."""

from __future__ import annotations

import json

import pytest
from bridge_helpers import write_tiny_llama_folder


@pytest.mark.slow
def test_the_bench_times_every_option_and_refuses_bad_input(tmp_path, capsys):
    from benchmarks.bench.bridge_options import main

    llm = write_tiny_llama_folder(tmp_path / "llm")
    out = tmp_path / "opts"
    args = ["--encoder", "preset:ov2-micro", "--llm", str(llm), "--batch", "2", "--steps", "1", "--repeats", "2",
            "--out", str(out)]
    assert main(args) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["option"] for r in rows] == ["full", "lora-r16", "lora-r128", "tokens-16", "tower"]
    assert rows[3]["tokens"] <= rows[0]["tokens"]  # a 32 px input never gives more visual tokens
    assert all(r["median_s"] > 0 and r["n"] == 2 for r in rows) and rows[0]["ratio_to_full"] == 1.0
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]  # LoRA trains far less than the whole LLM
    assert "| lora-r16 |" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # results are never overwritten silently
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--options", "full,nope"]) == 2
    assert "--options" in capsys.readouterr().err
