"""Shared test helpers (no tests here): the CLI in a fresh process, metrics records, magnitude-scaled tensor
comparison, and the trained runs that several test modules share (trained once per session)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from encoder.config import apply_overrides, equal_budget_recipe, get_preset
from ov2.runfolder import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m ov2 ARGS` in a fresh process; returns the completed process (never raises on failure)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "ov2", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kwargs)


def run_inprocess(*args: str, timeout: float | None = None, **_) -> subprocess.CompletedProcess:
    """`ov2 ARGS` through the same `ov2.cli.main` in this process (stdout/stderr captured, exit code from its return
    or SystemExit): for the many one-line-error checks, where a fresh interpreter per case costs seconds each."""
    import contextlib
    import io

    from ov2.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return subprocess.CompletedProcess(["ov2", *args], code, out.getvalue(), err.getvalue())


def records(run: str) -> list[dict]:
    """The metrics.jsonl records of a run folder."""
    return read_metrics(os.path.join(run, "metrics.jsonl"))


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, msg: str = "",
                        floor: float = 0.0) -> None:
    """|actual - expected| <= rel x max(max|expected|, floor) everywhere.

    Two float32 computations of the same quantity (2 ranks vs 1 process, chunked vs eager, ours vs transformers)
    differ in the last bits by an amount that follows the magnitude of the whole tensor (reduction order), not of
    each element: an element near zero can differ by far more than its own size. A fixed absolute or per-element
    relative tolerance therefore passes on one CPU and fails on the next; a tolerance scaled to the tensor does not.
    `floor`: the scale of a tensor that is small only because it started at zero (a bias after a few optimizer
    steps: its differences follow the step size, which is the same for every parameter, not its own size).
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(float(e.abs().max()) if e.numel() else 0.0, floor)
    worst = float((a - e).abs().max()) if e.numel() else 0.0
    assert worst <= rel * scale or worst == 0.0, (
        f"{msg}: max abs difference {worst:.3g} exceeds {rel:g} x the largest entry {scale:.3g}")


def linear_calls(fn):
    """Run `fn()`; returns ([(output dtype, output device type, autocast on that device type)] for every nn.Linear
    call made with gradients enabled (training forwards), fn's result)."""
    calls = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output) and torch.is_grad_enabled():
            calls.append((output.dtype, output.device.type, torch.is_autocast_enabled(output.device.type)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = fn()
    finally:
        handle.remove()
    return calls, result


# ov2-tiny on single-object built-in scenes at 64 px with the paper's keep ratio 0.35: long enough to learn colours
# and (more slowly) shapes. Shared by the ov2 learning tests.
OV2_LEARN = [
    "--data.kinds=shapes", "--synth_max_groups=1", "--stages.0.image_size=64", "--stages.0.steps=300",
    "--stages.0.lr=2e-3", "--stages.0.warmup_steps=15", "--stages.1.steps=1", "--stages.1.image_size=64",
    "--log_every=10", "--ckpt_every=1000", "--data.workers=1",
]


def train_ov2_tiny(out: str) -> str:
    """A really trained ov2-tiny run folder (a few CPU minutes)."""
    from encoder.train import train

    train(apply_overrides(get_preset("ov2-tiny"), OV2_LEARN), out)
    return out


def trained_run(tmp_path_factory, family: str) -> str:
    """`family`-micro trained with the equal-budget recipe of the baselines comparison (single-object scenes plus
    75 % Fashion-MNIST, 32 px, patch 4, 400 steps of 64), once per session, shared by every test module."""
    from encoder.checkpoint import latest_checkpoint
    from encoder.train import train

    out = str(tmp_path_factory.getbasetemp() / "trained" / family)
    if latest_checkpoint(out) is None:
        train(apply_overrides(get_preset(f"{family}-micro"), equal_budget_recipe()), out)
    return out
