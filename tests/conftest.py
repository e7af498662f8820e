import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny but real ov2 configuration for subprocess runs (seconds per run on 2 cores).
TINY = [
    "--model.vit.width=64", "--model.vit.depth=2", "--model.vit.heads=2", "--model.vit.mlp_dim=128",
    "--model.decoder.width=64", "--model.decoder.depth=1", "--model.decoder.heads=2", "--model.decoder.mlp_dim=128",
    "--stages.0.image_size=16", "--stages.1.image_size=32", "--stages.0.batch_size=8", "--stages.1.batch_size=8",
    "--data.workers=0",
]


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m ov2 ARGS` in a fresh process; returns the completed process (never raises on failure)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "ov2", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kwargs)


@pytest.fixture
def cli():
    return run_cli


# ov2-tiny on single-object built-in scenes at 64 px with the paper's keep ratio 0.35: long enough to learn colours
# and (more slowly) shapes. Shared by the learning tests and the SmolLM2 bridge test.
LEARN = [
    "--data.kinds=shapes", "--synth_max_groups=1", "--stages.0.image_size=64", "--stages.0.steps=300",
    "--stages.0.lr=2e-3", "--stages.0.warmup_steps=15", "--stages.1.steps=1", "--stages.1.image_size=64",
    "--log_every=10", "--ckpt_every=1000", "--data.workers=1",
]


@pytest.fixture(scope="session")
def ov2_tiny_run(tmp_path_factory):
    """A run folder of a really trained ov2-tiny (a few CPU minutes, once per test session)."""
    from encoder.config import apply_overrides, get_preset
    from encoder.train import train

    out = str(tmp_path_factory.mktemp("ov2_tiny") / "run")
    train(apply_overrides(get_preset("ov2-tiny"), LEARN), out)
    return out
