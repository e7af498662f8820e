"""`make gpu-check` (benchmarks/bench/gpu_check.py) where no GPU is: the harness logic. A check that runs past its
limit has its whole process group killed; a check whose optional package is missing is skipped, not failed; a rerun
into the same results folder passes and leaves no work files behind; the default table lists every GPU check as
skipped with the reason; `--cpu-smoke` runs the same harness with tiny shapes on the CPU."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from benchmarks.bench import gpu_check

PY = sys.executable
# a child that starts a grandchild sleeping a minute, writes the grandchild's pid to argv[1], then sleeps itself
GRANDPARENT = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)")


def _summary(out) -> dict:
    return {r["check"]: r for r in json.loads((out / "summary.json").read_text())["checks"]}


def _table(monkeypatch, *checks: dict) -> None:
    """Make the harness run exactly `checks` (whatever arguments it builds its table from)."""
    monkeypatch.setattr(gpu_check, "_checks", lambda *args, **kwargs: [dict(c) for c in checks])


def _gone(pid: int, wait: float = 5.0) -> bool:
    """The process has ended (a zombie waiting for init to reap it counts as ended)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_check_past_its_limit_has_its_whole_process_group_killed(tmp_path, monkeypatch):
    """The grandchild of a timed-out check (a torchrun worker, a data loader) must not keep the GPU into the next."""
    pidfile = tmp_path / "grandchild.pid"
    _table(monkeypatch, {"name": "sleepy", "cuda": False, "limit": 4, "cmd": [PY, "-c", GRANDPARENT, str(pidfile)]})
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--only", "sleepy"]) == 1
    row = _summary(out)["sleepy"]
    assert row["status"] == "failed" and "4 s limit" in row["note"]
    pid = int(pidfile.read_text())
    try:
        assert _gone(pid), "the grandchild of the timed-out check is still running"
    finally:
        if not _gone(pid, 0):
            os.kill(pid, 9)


def test_a_missing_optional_package_is_skipped_not_failed(tmp_path, monkeypatch):
    _table(monkeypatch, {"name": "needs_pkg", "cuda": False, "limit": 60, "needs": ["ov2_no_such_package"],
                         "cmd": [PY, "-c", "import ov2_no_such_package"]},
           {"name": "plain", "cuda": False, "limit": 60, "cmd": [PY, "-c", "pass"]})
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    rows = _summary(tmp_path)
    assert rows["needs_pkg"]["status"] == "skipped"
    assert rows["needs_pkg"]["note"] == "needs ov2_no_such_package (not installed)"
    assert rows["plain"]["status"] == "ok"


def test_the_kernels_bench_skips_a_method_whose_package_is_missing(tmp_path, monkeypatch):
    """`ov2 bench kernels --methods cce` without cut-cross-entropy: a skipped row with the reason, exit 0."""
    from benchmarks.bench import kernels

    monkeypatch.setitem(kernels.OPTIONAL, "cce", "ov2_no_such_package")
    stem = tmp_path / "k"
    assert kernels.main(["--device", "cpu", "--methods", "cce", "--shapes", "caption", "--ns", "8",
                         "--out", str(stem)]) == 0
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [(r["method"], r["skipped"]) for r in rows] == [("cce", "ov2_no_such_package is not installed")]
    assert "ov2_no_such_package is not installed" in stem.with_suffix(".md").read_text()


def test_a_rerun_into_the_same_out_passes_and_leaves_no_work_behind(tmp_path, monkeypatch):
    """Each run's checks write into a fresh temporary folder (never the results folder), deleted at the end: a check
    that refuses an existing output folder passes twice in a row."""
    make = "import os, sys; os.makedirs(sys.argv[1]); print('work:', sys.argv[1])"
    monkeypatch.setattr(gpu_check, "_checks", lambda work, *args, **kwargs: [
        {"name": "makes_run", "cuda": False, "limit": 60, "cmd": [PY, "-c", make, str(work / "run")]}])
    out = tmp_path / "out"
    for _ in range(2):
        assert gpu_check.main(["--out", str(out)]) == 0
        assert _summary(out)["makes_run"]["status"] == "ok"
        work = (out / "makes_run.log").read_text().split("work: ")[1].split()[0]
        assert not os.path.exists(work) and not work.startswith(str(out))
    assert sorted(os.listdir(out)) == ["makes_run.log", "summary.json", "summary.md"]


def test_without_cuda_every_gpu_check_is_listed_as_skipped_with_the_reason(tmp_path):
    """`make gpu-check` on a CPU exits 0: the harness's own check runs, every GPU check is skipped, twice in a row."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs the checks for real")
    for _ in range(2):
        assert gpu_check.main(["--out", str(tmp_path)]) == 0
        rows = _summary(tmp_path)
        assert rows.pop("harness")["status"] == "ok"
        assert set(rows) == {"kernel_tests", "kernels", "pretrain", "pretrain_fsdp", "train_cost", "bridge_eval"}
        assert {(r["status"], r["note"]) for r in rows.values()} == {("skipped", "needs a CUDA GPU")}
        assert "--cpu-smoke" in (tmp_path / "summary.md").read_text()
    assert gpu_check.main(["--out", str(tmp_path), "--only", "nope"]) == 2


def test_the_gpu_checks_fit_in_ten_minutes():
    """The limits of the GPU table add up to at most 10 minutes (each check is stopped at its own)."""
    from pathlib import Path

    assert sum(c["limit"] for c in gpu_check._checks(Path("/nonexistent"))) <= 600


@pytest.mark.slow  # ~1-2 min on 2 cores: a kernels bench, two micro trainings, two one-process FSDP2 trainings
def test_cpu_smoke_runs_the_harness_with_tiny_shapes(tmp_path):
    """The same harness on the CPU: timeouts and process groups (its own check), the kernels bench, a pretraining
    with images/s, step time and peak memory, and FSDP2 on one gloo process with a sharded save and an exact
    resume."""
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    rows = _summary(tmp_path)
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"harness", "kernels", "pretrain", "pretrain_fsdp"}
    assert {r["status"] for r in rows.values()} == {"ok", "skipped"}
    measured = rows["pretrain"]["measured"]
    assert measured["images_per_s"] > 0 and measured["step_s"] > 0 and measured["peak_mb"] > 0
    fsdp = rows["pretrain_fsdp"]["measured"]
    assert fsdp["sharded_parts"] == ["__0_0.distcp"] and fsdp["max_weight_diff"] == 0.0 and fsdp["rng_equal"]
    text = (tmp_path / "summary.md").read_text()
    assert "images/s" in text and "peak" in text
    assert not any(name.endswith((".safetensors", ".distcp", ".pt")) for _, _, files in os.walk(tmp_path)
                   for name in files)
