"""`ov2 run`: a tiny real experiment (micro encoders, a tiny random Llama, two built-in tasks through lmms-eval),
run twice, changed, killed and resumed, broken, and under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ov2.runfolder import read_status
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> str:
    from bridge.llm import load_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llm")
    tokenizer = load_tokenizer("smollm2")
    tiny_llama(tokenizer, init_std=0.3).save_pretrained(folder)  # varied, non-empty greedy answers
    tokenizer.save_pretrained(folder)
    return str(folder)


def experiment(tiny_llm: str, **encoders) -> dict:
    return {
        "name": "tiny",
        "pretrain": {"stages.0.steps": 4, "stages.1.steps": 2, "ckpt_every": 2},
        "encoders": encoders or {"a": {"preset": "ov2-micro"}, "b": {"preset": "clip-micro"}},
        "bridge": {"llm": tiny_llm, "overrides": {"stage1.steps": 2, "stage2.steps": 6, "stage1.batch_size": 2,
                                                  "stage2.batch_size": 2, "stage2.ckpt_every": 1,
                                                  "eval_samples": 0}},
        "eval": {"tasks": ["ov2_gqa", "ov2_pope"], "limit": 3},
        "encoder_eval": {"n_train": 40, "n_test": 20, "baseline": False},
        "report": False,
        "controls": [],  # the controls run in test_demo's default experiment; here they would only add time
    }


def write(tmp: Path, tree: dict, name: str = "exp.yaml") -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def stage_lines(stderr: str) -> dict[str, str]:
    """{"a/pretrain": its first line ("done before ...", "starting ...", "resuming ...", ...)} from the runner."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("[") and "] " in line and " · " in line:
            head, _, rest = line.partition("] ")[2].partition(": ")
            enc, _, stage = head.partition(" · ")
            out.setdefault(f"{enc}/{stage}", rest)
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_llm):
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "no-such-run").mkdir()  # a damaged run: the plan finds its config.yaml, the export cannot read it
    (tmp / "no-such-run" / "config.yaml").write_text("model: [unclosed\n")
    tree = experiment(tiny_llm, a={"preset": "ov2-micro"}, b={"preset": "clip-micro"},
                      broken={"checkpoint": str(tmp / "no-such-run")})
    exp = write(tmp, tree)
    res = run_cli("run", exp, "--out", str(tmp / "run"), timeout=900)
    return tmp, tree, exp, res


def test_failed_encoder_is_recorded_and_the_others_complete(first_run):
    tmp, _, _, res = first_run
    assert res.returncode == 1, res.stderr[-3000:]
    run = tmp / "run"
    for enc in ("a", "b"):
        for stage in ("pretrain", "export", "bridge", "eval", "encoder_eval"):
            assert read_status(run / "encoders" / enc / stage)["state"] == "ok", (enc, stage, res.stderr[-3000:])
    broken = read_status(run / "encoders" / "broken" / "export")
    assert broken["state"] == "failed" and "no-such-run" in broken["error"]
    assert read_status(run / "encoders" / "broken" / "bridge")["state"] == "skipped"
    assert read_status(run / "encoders" / "broken" / "eval")["state"] == "skipped"
    assert "FAILED broken/export" in res.stderr
    table = pd.read_csv(run / "results.csv")
    assert set(table["encoder"]) == {"a", "b"}
    assert {"ov2_gqa", "ov2_pope", "fmnist_probe", "fmnist_zeroshot"} <= set(table["task"])
    assert list(table.columns[:10]) == ["experiment", "encoder", "role", "task", "metric", "value", "stderr", "n",
                                        "chance", "seed"]
    assert pd.read_parquet(run / "results.parquet").shape == table.shape
    status = read_status(run / "encoders" / "a" / "bridge")
    assert status["wall_s"] > 0 and status["peak_rss_mb"] > 100


def test_second_run_skips_every_finished_stage(first_run):
    tmp, _, exp, res = first_run
    before = pd.read_csv(tmp / "run" / "results.csv")
    again = run_cli("run", exp, "--out", str(tmp / "run"), timeout=600)
    lines = stage_lines(again.stderr)
    for enc in ("a", "b"):
        for stage in ("pretrain", "export", "bridge", "eval", "encoder_eval"):
            assert lines[f"{enc}/{stage}"].startswith("done before"), (enc, stage, again.stderr[-2000:])
    pd.testing.assert_frame_equal(pd.read_csv(tmp / "run" / "results.csv"), before)


def test_changing_one_encoder_reruns_only_its_stages(first_run, tiny_llm):
    tmp, tree, _, _ = first_run
    tree = {**tree, "encoders": {**tree["encoders"], "b": {"preset": "clip-micro", "overrides": {"stages.0.lr": 1e-3}}}}
    res = run_cli("run", write(tmp, tree, "changed.yaml"), "--out", str(tmp / "run"), timeout=900)
    lines = stage_lines(res.stderr)
    assert all(lines[f"a/{s}"].startswith("done before") for s in ("pretrain", "export", "bridge", "eval"))
    assert all(lines[f"b/{s}"].startswith(("settings changed", "ok")) for s in ("pretrain", "export", "bridge"))
    assert read_status(tmp / "run" / "encoders" / "b" / "eval")["state"] == "ok"
    assert any((tmp / "run" / "encoders" / "b" / ".superseded").iterdir())  # the old folders are kept


def test_kill_during_bridge_then_rerun_gives_the_same_results(first_run, tmp_path):
    tmp, tree, _, _ = first_run
    one = {**tree, "encoders": {"a": tree["encoders"]["a"]}}
    exp, run = write(tmp_path, one), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "ov2", "run", exp, "--out", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage2 = run / "encoders" / "a" / "bridge" / "stage2"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if stage2.is_dir() and any(p.name.startswith(("ckpt", "checkpoints")) for p in stage2.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the bridge's stage 2 wrote a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the stage process dies with its parent (PDEATHSIG)
    assert read_status(run / "encoders" / "a" / "bridge")["state"] == "interrupted"
    res = run_cli("run", exp, "--out", str(run), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert stage_lines(res.stderr)["a/bridge"].startswith("resuming")
    resumed = pd.read_csv(run / "results.csv").drop(columns="experiment")
    full = pd.read_csv(tmp / "run" / "results.csv").drop(columns="experiment")
    full = full[full["encoder"] == "a"].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed, full, rtol=1e-9)


def test_two_process_training_under_the_scale_out_option(tiny_llm, tmp_path):
    tree = experiment(tiny_llm, a={"preset": "ov2-micro"})
    tree.update(nproc=2, encoder_eval={"enabled": False}, eval={"tasks": ["ov2_pope"], "limit": 5})
    res = run_cli("run", write(tmp_path, tree), "--out", str(tmp_path / "run"), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("pretrain", "bridge", "eval"):  # training and lmms-eval, each as 2 processes
        log = (tmp_path / "run" / "encoders" / "a" / stage / "stage.log").read_text()
        assert "torch.distributed.run" in log and "--nproc_per_node=2" in log, (stage, log[:500])
    # lmms-eval shared the 5 questions out (3 + 2 with its padding) and rank 0 gathered every answer once
    samples = (tmp_path / "run" / "encoders" / "a" / "eval" / "samples" / "ov2_pope.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["doc_id"] for line in samples) == [0, 1, 2, 3, 4]
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert results.query("task == 'ov2_pope' and metric == 'accuracy'")["n"].tolist() == [5]


def test_two_machines_meet_in_every_distributed_stage(tiny_llm, tmp_path):
    """`nnodes: 2` played on one machine: node 1 starts first and waits; node 0 runs the plan and writes everything;
    pretraining, the bridge and lmms-eval each run as one process per node, meeting at `master`."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tree = experiment(tiny_llm, a={"preset": "ov2-micro"})
    tree.update(nnodes=2, master=f"127.0.0.1:{port}", encoder_eval={"enabled": False},
                eval={"tasks": ["ov2_pope"], "limit": 5})
    exp, run = write(tmp_path, tree), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    follower = subprocess.Popen([sys.executable, "-m", "ov2", "run", exp, "--out", str(run), "--node-rank", "1"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        res = run_cli("run", exp, "--out", str(run), timeout=900)
        _, follower_err = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert res.returncode == 0, res.stderr[-3000:]
    assert follower.returncode == 0, follower_err[-3000:]
    for stage in ("pretrain", "bridge", "eval"):
        folder = run / "encoders" / "a" / stage
        log = (folder / "stage.log").read_text()
        assert "--nnodes=2" in log and "--node_rank=0" in log, stage
        assert "--node_rank=1" in folder.with_name(f"{stage}.node1.log").read_text(), stage  # node 1's own log
    assert not (run / "encoders" / "a" / "export.node1.log").exists()  # node 0 alone runs the rest
    samples = (run / "encoders" / "a" / "eval" / "samples" / "ov2_pope.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["doc_id"] for line in samples) == [0, 1, 2, 3, 4]
    bad = run_cli("run", exp, "--out", str(run), "--node-rank", "2", timeout=120)
    assert bad.returncode == 2 and "--node-rank 2" in bad.stderr


@pytest.mark.parametrize("tree, message", [
    ({"name": "x"}, "encoders"),
    ({"encoders": {"a": {"preset": "ov2-micro", "checkpoint": "x"}}}, "exactly one"),
    ({"encoders": {"a": {"preset": "ov2-micro"}}, "eval": {"limit": "many"}}, "eval.limit"),
    ({"encoders": {"a": {"preset": "ov2-micro"}}, "bogus": 1}, "unknown key 'bogus'"),
    ({"encoders": {"a b": {"preset": "ov2-micro"}}}, "name"),
    ([1, 2], "mapping"),
])
def test_bad_experiment_is_one_line_and_exit_2(tmp_path, tree, message):
    res = run_cli("run", write(tmp_path, tree), "--out", str(tmp_path / "run"), timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_out_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = run_cli("run", os.path.join(ROOT, "benchmarks/runner/experiments/default.yaml"), "--out", str(out),
                  timeout=120)
    assert res.returncode == 2 and "not an ov2 run" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
