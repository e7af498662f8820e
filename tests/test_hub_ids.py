"""A Hub id is accepted wherever an LLM folder is (`--llm lmsys/vicuna-7b-v1.5`): the bridge hands it to
`from_pretrained`, which resolves it from the Hugging Face cache (tested offline with a cache written here); an id
that cannot be had is one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bridge_helpers import write_tiny_llama_folder

from tests.helpers import ROOT

CODE = """
from bridge.llm import load_llm, resolve_llm
assert resolve_llm("ov2-test/tiny-llama") == "ov2-test/tiny-llama"
model, tokenizer = load_llm("ov2-test/tiny-llama")
print(type(model).__name__, model.config.num_hidden_layers, len(tokenizer))
"""


@pytest.mark.slow
def test_an_llm_by_hub_id_loads_from_the_hub_cache_offline(tmp_path):
    snapshot = tmp_path / "hub" / "models--ov2-test--tiny-llama" / "snapshots" / "0123abcd"
    write_tiny_llama_folder(snapshot)
    (tmp_path / "hub" / "models--ov2-test--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--ov2-test--tiny-llama" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["LlamaForCausalLM", "2"]
    missing = subprocess.run([sys.executable, "-m", "ov2", "bridge", "train", "--encoder", "preset:ov2-micro",
                              "--llm", "ov2-test/not-cached", "--out", str(tmp_path / "run")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    err = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(err) == 1 and "'ov2-test/not-cached'" in err[0], missing.stderr[-1500:]
