"""The run-folder contract: pretraining and a bridge stage write the same folder, read by the same code; both resume
exactly after kill -9; checkpoints are written once atomically and a damaged newest one falls back to an older one;
a cut metrics line is dropped; a second writer is refused naming the holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ov2 import checkpoint as core
from ov2.runfolder import MetricsLog, RunLock, read_run
from tests.helpers import ROOT, assert_close_scaled, run_cli

MICRO = ["--preset", "ov2-micro", "--data.workers=0"]

def bridge_stage(ckpt, out, slow=0.0) -> None:
    """One bridge stage-2 run on a tiny random Llama and our tiny checkpoint; each sample takes `slow` seconds to
    read, so that a kill -9 lands in the middle of the run. The final weights go next to `out`."""
    from bridge_helpers import smollm2_tokenizer
    from safetensors.torch import save_file

    from bridge.assemble import assemble
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthInstructions
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower
    from bridge.train import train_stage, trainable_state
    from ov2 import distributed

    distributed.setup()  # joins the process group when started by torchrun
    out, slow = Path(out), float(slow)
    tok = smollm2_tokenizer()
    tower = load_tower(ckpt)
    model, processor = assemble(tower, tiny_llama(tok, seed=0, init_std=0.1), tok, seed=0)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    data = SynthInstructions(12, image_size=32)

    class Slow:
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            time.sleep(slow)
            return data[i]

    cfg = LlavaStageConfig(stage=2, steps=8, batch_size=2, lr=1e-3, ckpt_every=1, progress=False,
                          bf16="false")  # 2 ranks = 1 process in float32 on any CPU
    train_stage(model, Slow(), collate, cfg, out)
    rank = f".rank{distributed.rank()}" if distributed.world_size() > 1 else ""
    save_file(trainable_state(model), str(out.parent / f"{out.name}{rank}.final.safetensors"))
    distributed.teardown()


def _bridge_process(ckpt: Path, out: Path, slow: float = 0.0, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}"}
    code = "import sys; from tests.test_runfolder import bridge_stage; bridge_stage(*sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(out), str(slow)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return proc


def _kill_after_checkpoint(proc, run: Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = core.list_checkpoints(run)
        if found and int(found[-1].name[5:]) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def our_ckpt(tmp_path_factory):
    from bridge_helpers import write_our_checkpoint

    folder = tmp_path_factory.mktemp("ours")
    write_our_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    from encoder.config import apply_overrides, get_preset
    from encoder.train import train

    run = tmp_path_factory.mktemp("pre") / "run"
    train(apply_overrides(get_preset("ov2-micro"), ["--data.workers=0"]), str(run))
    return run


@pytest.fixture(scope="module")
def bridge_run(our_ckpt, tmp_path_factory):
    """A finished bridge stage-2 run folder (in this process); the reference of the kill -9 test."""
    run = tmp_path_factory.mktemp("bridge") / "straight"
    bridge_stage(our_ckpt, run)
    return run


def test_pretraining_and_bridge_stage_folders_are_read_by_the_same_code(pretrain_run, bridge_run):
    stage = bridge_run
    for run, steps, kind in ((pretrain_run, 20, "pretrain"), (stage, 8, "bridge_stage2")):
        info = read_run(run)
        assert info["status"]["state"] == "ok" and info["status"]["kind"] == kind
        assert len(info["status"]["key"]) == 16 and info["status"]["wall_s"] > 0
        assert info["step"] == steps == info["checkpoints"][-1] == info["metrics"][-1]["step"]
        assert isinstance(info["config"], dict)
        newest = core.list_checkpoints(run)[-1]
        assert core.damage(newest) is None
        assert {"model.safetensors", "optimizer.pt", "trainer.json", "rng_rank0.pt", "config.yaml"} <= {
            p.name for p in newest.iterdir()}
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not (stage / "ckpt").exists()  # the bridge's old two-rename layout is gone


def test_one_metrics_schema_for_every_trainer(pretrain_run, bridge_run):
    for run, extra in ((pretrain_run, {"stage", "caption_loss", "samples_per_s"}), (bridge_run, {"stage", "tokens"})):
        metrics = read_run(run)["metrics"]
        assert metrics and all({*MetricsLog.FIELDS, *extra} <= set(r) for r in metrics), metrics[0]
        elapsed = [r["elapsed_s"] for r in metrics]
        assert elapsed == sorted(elapsed) and elapsed[-1] > 0


@pytest.mark.slow
def test_bridge_stage_resumes_exactly_after_kill9(our_ckpt, bridge_run, tmp_path):
    straight, broken = bridge_run, tmp_path / "broken"
    proc = _bridge_process(our_ckpt, broken, slow=0.15, wait=False)
    _kill_after_checkpoint(proc, broken, 3)
    assert read_run(broken)["status"]["state"] == "interrupted"  # running, but its process is gone
    killed_at = read_run(broken)["step"]
    assert 3 <= killed_at < 8
    _bridge_process(our_ckpt, broken)
    a = load_file(str(straight.parent / "straight.final.safetensors"))
    b = load_file(str(tmp_path / "broken.final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_run(broken)["metrics"]]
    assert steps == list(range(1, 9))
    assert [r["loss"] for r in read_run(broken)["metrics"]] == [r["loss"] for r in read_run(straight)["metrics"]]


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_resume_is_still_exact(pretrain_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run)
    for step in (20, 12):  # keep step 10 (checkpoints 10, 12, 20 with keep_last 3)
        shutil.rmtree(core.step_path(run, step))
    kept = core.list_checkpoints(run)
    assert [p.name for p in kept] == ["step_0000010"]
    # a newer checkpoint whose optimizer file was cut (a crash while the disk filled up)
    shutil.copytree(kept[-1], core.step_path(run, 11))
    state = json.loads((core.step_path(run, 11) / "trainer.json").read_text())
    (core.step_path(run, 11) / "trainer.json").write_text(json.dumps({**state, "step": 11}))
    optimizer = core.step_path(run, 11) / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 1.2')  # a cut last line
    result = run_cli("train", "--out", str(run), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step_0000011 is damaged (optimizer.pt has 1000 bytes" in result.stderr
    a = load_file(str(core.step_path(pretrain_run, 20) / "model.safetensors"))
    b = load_file(str(core.step_path(run, 20) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_run(run)["metrics"]] == [r["step"] for r in read_run(pretrain_run)["metrics"]]


def test_bridge_stage_falls_back_from_a_damaged_checkpoint(our_ckpt, bridge_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "straight"  # the same name: the final weights land next to it
    shutil.copytree(bridge_run, run)
    for name in ("final.safetensors", "done.json"):  # as if the process died after writing step 8's checkpoint
        (run / name).unlink()
    weights = core.step_path(run, 8) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    bridge_stage(our_ckpt, run)
    assert "step_0000008 is damaged (model.safetensors has" in capsys.readouterr().err
    a = load_file(str(bridge_run.parent / "straight.final.safetensors"))
    b = load_file(str(tmp_path / "straight.final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_run(run)["metrics"]] == list(range(1, 9))


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_clear_error(pretrain_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run)
    for path in core.list_checkpoints(run):
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    for cmd in (["train", "--out", str(run), "--resume"], ["caption", "--ckpt", str(run), __file__]):
        result = run_cli(*cmd)
        assert result.returncode in (1, 2) and "no intact checkpoint" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_second_writer_is_refused_naming_the_holder(pretrain_run, tmp_path):
    run = tmp_path / "busy"
    with RunLock(run):
        result = run_cli("train", "--out", str(run), *MICRO)
    assert result.returncode == 2 and f"pid {os.getpid()}" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "status.json").exists()


@pytest.mark.slow  # a 2-process torchrun
def test_bridge_stage_under_torchrun_trains_one_model_and_writes_once(our_ckpt, bridge_run, tmp_path):
    """2 ranks x 1 sample = 1 process x 2 samples: the loss is the mean over the global batch's answer tokens, so
    the weights after 8 steps and every logged loss match the one-process run."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(our_ckpt), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "rank1" in line or
                                              "Error" in line)[-3000:]
    a, b = (load_file(str(tmp_path / f"ddp.rank{r}.final.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # gradients averaged over ranks
    info = read_run(out)
    assert info["status"]["state"] == "ok" and [r["step"] for r in info["metrics"]] == list(range(1, 9))
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in core.list_checkpoints(out)[-1].iterdir()}
    final = load_file(str(out / "final.safetensors"))
    assert all(torch.equal(final[k], a[k]) for k in a)
    one = load_file(str(bridge_run.parent / f"{bridge_run.name}.final.safetensors"))
    assert one.keys() == a.keys()
    for k in one:
        assert_close_scaled(a[k], one[k], rel=1e-4, msg=k)
    ref = [r["loss"] for r in read_run(bridge_run)["metrics"]]
    assert_close_scaled(torch.tensor([r["loss"] for r in info["metrics"]]), torch.tensor(ref), rel=1e-4,
                        msg="logged losses")


if __name__ == "__main__":  # one bridge stage, as a script (torchrun runs it on every rank)
    bridge_stage(*sys.argv[1:])



class FakeCuda:
    """torch.cuda's RNG calls as a machine with `count` visible devices answers them (this one has none): a state per
    device, "cuda" meaning the current one, and torch's own errors for a device that is not there."""

    def __init__(self, count: int, current: int = 0):
        self.count, self.current = count, current
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(count)}

    def _index(self, device="cuda") -> int:
        index = self.current if device == "cuda" else int(device)  # the calls made here: "cuda" or an index
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, monkeypatch) -> FakeCuda:
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name, value in (("is_available", True), ("is_initialized", True), ("device_count", self.count),
                            ("current_device", self.current)):
            monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
        return self


def _saved_and_read(monkeypatch, tmp_path, cuda: FakeCuda) -> dict:
    cuda.install(monkeypatch)
    torch.save(core.rank_state(), tmp_path / "rng.pt")
    return torch.load(tmp_path / "rng.pt", weights_only=True)


def test_cuda_rng_is_saved_and_restored_for_the_current_device_only(monkeypatch, tmp_path, capsys):
    """Each process saves the CUDA RNG state of the device it computes on and restores that one: a checkpoint written
    where 8 GPUs were visible resumes where 1 is (torchrun's rank 5 on cuda:5, resumed in a job that shows each process
    only its own GPU). A checkpoint that holds every visible device's state (older ones) gives the current device's
    entry back; one without it is said, not an error."""
    saved = _saved_and_read(monkeypatch, tmp_path, FakeCuda(8, current=5))
    assert torch.equal(saved["cuda"], torch.full((8,), 5, dtype=torch.uint8))  # cuda:5's own, not all eight
    one = FakeCuda(1).install(monkeypatch)
    core.restore_rng({"rng": saved})
    assert torch.equal(one.states[0], saved["cuda"])
    older = {**saved, "cuda": [torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(8)]}
    for count, current in ((1, 0), (8, 3)):
        cuda = FakeCuda(count, current).install(monkeypatch)
        core.restore_rng({"rng": older})
        assert torch.equal(cuda.states[current], older["cuda"][current])
    few = FakeCuda(4, current=3).install(monkeypatch)
    core.restore_rng({"rng": {**older, "cuda": older["cuda"][:2]}})
    assert torch.equal(few.states[3], torch.full((8,), 3, dtype=torch.uint8))  # left as it was
    assert "none for cuda:3" in capsys.readouterr().err
