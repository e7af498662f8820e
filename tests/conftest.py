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
