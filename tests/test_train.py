"""Training: the caption loss falls and greedy captions name the right colour and shape; exact resume after
SIGKILL; the NaN guard stops a diverging run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from encoder.checkpoint import latest_checkpoint, load_model
from encoder.config import apply_overrides, get_preset
from encoder.data.synth import COLOURS, SHAPES, make_scene
from encoder.data.transforms import eval_transform
from encoder.tokenizer import get_tokenizer
from tests.helpers import ROOT, linear_calls, records, run_inprocess


@pytest.mark.slow
def test_caption_loss_falls(ov2_tiny_run):
    logged = records(ov2_tiny_run)
    first, last = logged[0]["caption_loss"], logged[-1]["caption_loss"]
    assert last < 0.4 * first, (first, last)
    assert all(r["skipped"] == 0 for r in logged)


@pytest.mark.slow
def test_greedy_captions_name_colour_and_shape(ov2_tiny_run):
    model, cfg = load_model(ov2_tiny_run)
    tokenizer = get_tokenizer()
    transform = eval_transform(64)
    scenes = [make_scene(999, i, 64, kinds=("shapes",), max_groups=1) for i in range(128)]  # held-out seed
    pixels = torch.stack([transform(s.image) for s in scenes])
    captions = [tokenizer.decode(ids) for ids in model.generate(pixels, 24)]

    def first_word_of(caption, vocab):
        words = caption.split()
        hits = [(words.index(w if w in words else f"{w}s"), w) for w in vocab if w in words or f"{w}s" in words]
        return min(hits)[1] if hits else None

    colours = [first_word_of(c, COLOURS) for c in captions]
    shapes = [first_word_of(c, SHAPES) for c in captions]
    colour_acc = sum(c == s.objects[0]["colour"] for c, s in zip(colours, scenes)) / len(scenes)
    shape_acc = sum(c == s.objects[0]["shape"] for c, s in zip(shapes, scenes)) / len(scenes)
    print(f"held-out colour accuracy {colour_acc:.2f} (chance {1 / len(COLOURS):.2f}), "
          f"shape accuracy {shape_acc:.2f} (chance {1 / len(SHAPES):.2f})")
    assert colour_acc > 0.6, captions[:8]
    # shapes are learned more slowly than colours at this budget: every caption must still name a shape, and the
    # model must not collapse onto one shape word
    assert None not in shapes and len(set(shapes)) >= 3, captions[:8]


@pytest.mark.slow
def test_caption_cli(ov2_tiny_run, cli, tmp_path):
    path = tmp_path / "scene.png"
    make_scene(999, 0, 64, kinds=("shapes",), max_groups=1).image.save(path)
    result = cli("caption", "--ckpt", ov2_tiny_run, str(path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(path)) and "background" in result.stdout


RESUME = ["--preset", "ov2-micro", "--ckpt_every=2", "--keep_last=2", "--data.workers=1"]  # 12 + 8 steps


def _final_weights(run: str) -> dict:
    return load_file(os.path.join(latest_checkpoint(run), "model.safetensors"))


@pytest.mark.slow  # two trainings in fresh processes, one killed
def test_exact_resume_after_sigkill(cli, tmp_path):
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    result = cli("train", "--out", full, *RESUME)
    assert result.returncode == 0, result.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "ov2", "train", "--out", broken, *RESUME], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpt = latest_checkpoint(broken)
        if ckpt and int(ckpt[-7:]) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(broken)[-7:])
    assert killed_at < 20
    result = cli("train", "--out", broken, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = _final_weights(full), _final_weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    steps = [r["step"] for r in records(broken)]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no duplicated metric lines after the resume


@pytest.mark.slow
def test_nan_guard_stops_a_diverging_run(cli, tmp_path):
    result = cli("train", "--out", str(tmp_path / "nan"), "--preset", "ov2-micro", "--stages.0.lr=1e30",
                 "--stages.0.warmup_steps=0", "--stages.0.steps=40", "--stages.1.steps=1", "--nan_patience=3")
    assert result.returncode == 1 and "not finite for 3 steps in a row" in result.stderr, result.stderr[-2000:]


def test_existing_run_needs_resume(tmp_path):
    cli = run_inprocess
    run = str(tmp_path / "run")
    args = ["--preset", "ov2-micro", "--stages.0.steps=2", "--stages.1.steps=1"]
    assert cli("train", "--out", run, *args).returncode == 0
    assert latest_checkpoint(run).endswith("step_0000003") and [r["step"] for r in records(run)] == [2, 3]
    before = _final_weights(run)
    result = cli("train", "--out", run, *args)
    assert result.returncode == 2 and "--resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    after = _final_weights(run)  # the refused run left the user's checkpoint alone
    assert all(torch.equal(before[k], after[k]) for k in before) and [r["step"] for r in records(run)] == [2, 3]


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_runs_under_autocast_on_the_models_device(tmp_path, bf16):
    from encoder.train import train

    cfg = apply_overrides(get_preset("ov2-micro"), [f"--bf16={bf16}", "--stages.0.steps=2", "--stages.1.steps=1"])
    calls, _ = linear_calls(lambda: train(cfg, str(tmp_path / "run")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = (torch.bfloat16, device, True) if bf16 else (torch.float32, device, False)
    assert len(calls) > 3 * 10 and set(calls) == {expected}, set(calls)  # every Linear of the three steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(str(tmp_path / "run")))
