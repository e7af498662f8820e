"""`make gpu-check` (benchmarks/bench/gpu_check.py) where no GPU is: it says what it skipped and why."""

from __future__ import annotations

import pytest


def test_gpu_check_runs_what_it_can_and_lists_what_it_skipped(tmp_path):
    """`make gpu-check` on a machine without CUDA: every CUDA check listed as skipped, with the reason."""
    import json

    import torch

    from benchmarks.bench.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs the checks for real")
    assert main(["--out", str(tmp_path), "--only", "kernel_tests,kernels,pretrain_l14,train_cost"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["check"], r["status"], r["note"]) for r in summary["checks"]] == [
        (name, "skipped", "needs a CUDA GPU") for name in ("kernel_tests", "kernels", "pretrain_l14", "train_cost")]
    assert "Skipped here (no CUDA GPU): kernel_tests, kernels, pretrain_l14, train_cost" in \
        (tmp_path / "summary.md").read_text()
    assert main(["--out", str(tmp_path), "--only", "nope"]) == 2
