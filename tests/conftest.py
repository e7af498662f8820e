import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.helpers import run_cli, train_ov2_tiny  # noqa: E402


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def ov2_tiny_run(tmp_path_factory):
    """A run folder of a really trained ov2-tiny (a few CPU minutes, once per test session); slow tests only."""
    return train_ov2_tiny(str(tmp_path_factory.mktemp("ov2_tiny") / "run"))
