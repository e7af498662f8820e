"""Bridge stage 2 on several processes through an engine (bridge.engine): FSDP2 with the LLM sharded over 2 ranks
(gloo, CPU) trains the same weights, with the same losses, as one process on the same global batch, for a tiny
Llama-style LLM (tied embeddings) and a Qwen2-style one (untied, grouped-query attention); its sharded checkpoint
resumes on 2 processes and is re-sharded onto 1; DDP (the default engine) agrees too.

This file is also the worker script: `torchrun --standalone --nproc_per_node=2 tests/test_bridge_fsdp.py ARGS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tests.helpers import assert_close_scaled  # noqa: E402

STEPS = 3


def _llm(kind: str, tokenizer):
    from bridge.llm import tiny_llama

    if kind == "llama":
        return tiny_llama(tokenizer, seed=0, init_std=0.1)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def held_bytes() -> int:
    """Bytes of every tensor storage this process holds (each storage once): what its parameters really cost."""
    import gc

    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            tensors = [obj._local_tensor] if hasattr(obj, "_local_tensor") else [obj]
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr():
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Probe:
    """Stage 2's data for the probe run: rank 1 draws only text-only records (as a LLaVA mix's text-only share can
    fall); at the first batch of stage 2 (after the engine sharded the model) the process's held bytes are noted."""

    def __init__(self, data, collate, out: Path, model_bytes: int):
        self.data, self.collate, self.out, self.model_bytes = data, collate, out, model_bytes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        from ov2 import distributed as dist

        record = self.data[i]
        if dist.rank() == 1:
            return {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes"}],
                    "image": None}
        return record

    def collate_fn(self, records):
        from ov2 import distributed as dist

        path = self.out / f"held_rank{dist.rank()}.json"
        if not path.exists():
            path.write_text(json.dumps({"held": held_bytes(), "model": self.model_bytes}))
        return self.collate(records)


def train(encoder: str, kind: str, out: str, fsdp: bool = True, stop_after: int | None = None,
          probe: bool = False) -> dict:
    """Stage 1 (1 step: projector) then stage 2 under the engine, in this process's group (or alone)."""
    from bridge_helpers import smollm2_tokenizer

    from bridge.assemble import assemble
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthCaptions, SynthInstructions
    from bridge.towers import load_tower
    from bridge.train import train_stage

    tokenizer = smollm2_tokenizer()
    tower = load_tower(encoder)
    model, processor = assemble(tower, _llm(kind, tokenizer), tokenizer, seed=0, template="chatml")
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    common = dict(batch_size=4, ckpt_every=1, keep_last=3, progress=False, bf16="false", warmup_ratio=0.0)
    train_stage(model, SynthCaptions(8, image_size=32), collate, LlavaStageConfig(stage=1, steps=1, **common),
                Path(out) / "stage1")
    cfg = LlavaStageConfig(stage=2, steps=STEPS, lr=1e-3, fsdp=fsdp, gradient_checkpointing=True, **common)
    data = SynthInstructions(16, image_size=32, kinds=("shapes",))
    if probe:
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        probe = Probe(data, collate, Path(out), model_bytes)
        data, collate = probe, probe.collate_fn
    return train_stage(model, data, collate, cfg, Path(out) / "stage2", stop_after=stop_after)


def worker(encoder: str, kind: str, out: str, fsdp: str, stop_after: str) -> None:
    from ov2 import distributed as dist

    dist.setup()
    train(encoder, kind, out, fsdp in ("fsdp", "probe"), int(stop_after) or None, probe=fsdp == "probe")
    dist.teardown()


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "stage2" / "final.safetensors"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from bridge_helpers import write_our_checkpoint

    folder = tmp_path_factory.mktemp("enc")
    write_our_checkpoint(folder)
    return str(folder)


@pytest.mark.slow  # 2-process torchrun trainings
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sharded_stage2_equals_one_process_and_resumes(encoder, kind, tmp_path):
    """Both LLMs: 2 sharded processes = 1 process; the Llama one: a sharded checkpoint resumes on 2 and on 1."""
    one = tmp_path / "one"
    train(encoder, kind, str(one))  # one process: fsdp has no effect
    two = tmp_path / "two"
    res = torchrun(encoder, kind, str(two), "fsdp", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    checkpoint = two / "stage2" / "checkpoints" / f"step_{STEPS:07d}"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (checkpoint / "sharded").iterdir()}
    reference, sharded = _final(one), _final(two)
    assert set(sharded) == set(reference) and any("layers.1.mlp" in n for n in sharded)
    for name, weight in reference.items():  # biases start at 0: scaled as the weights are (init_std 0.1)
        assert_close_scaled(sharded[name], weight, msg=name, floor=0.1)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(reference[projector], _stage1_projector(one)[projector])  # stage 2 trained it

    if kind != "llama":
        return  # resuming is the engine's, whatever the LLM: once is enough (each torchrun costs ~15 s)
    # killed after step 1 (its checkpoint is sharded), resumed on 2 processes: the same weights
    cut = tmp_path / "cut"
    res = torchrun(encoder, kind, str(cut), "fsdp", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (cut / "stage2" / "final.safetensors").exists()
    res = torchrun(encoder, kind, str(cut), "fsdp", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    for name, weight in _final(two).items():
        assert torch.equal(_final(cut)[name], weight), name
    assert _losses(cut) == _losses(two)

    # the same sharded checkpoint re-sharded onto one process
    alone = tmp_path / "alone"
    res = torchrun(encoder, kind, str(alone), "fsdp", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    train(encoder, kind, str(alone))
    for name, weight in reference.items():
        assert_close_scaled(_final(alone)[name], weight, msg=name, floor=0.1)


@pytest.mark.slow  # a 2-process torchrun
def test_sharded_stage2_holds_half_the_model_and_survives_a_text_only_rank(encoder, tmp_path):
    """2 ranks under FSDP2: after sharding each holds about half of the model's bytes (no whole copy kept alive by
    the stage's own references), and a rank whose micro-batches hold no image still gives the projector a gradient,
    so the reduce-scatters agree and the stage finishes (it hung, or failed, when that rank skipped the projector)."""
    res = torchrun(encoder, "llama", str(tmp_path), "probe", "0", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "stage2" / "final.safetensors").is_file()
    for rank in (0, 1):
        held = json.loads((tmp_path / f"held_rank{rank}.json").read_text())
        assert held["held"] < 0.65 * held["model"], held  # ~1/2 + what is not a parameter; 1.5x with a whole copy


def _stage1_projector(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "stage1" / "final.safetensors"))


@pytest.mark.slow  # a 2-process torchrun
def test_ddp_stage2_equals_one_process(encoder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(encoder, "llama", str(one), fsdp=False)
    res = torchrun(encoder, "llama", str(two), "ddp", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (two / "stage2" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors").is_file()  # whole, rank 0
    for name, weight in _final(one).items():
        assert_close_scaled(_final(two)[name], weight, msg=name, floor=0.1)


def test_fsdp_is_a_stage2_key_and_not_with_lora():
    from bridge.config import LlavaStageConfig
    from ov2.config import ConfigError

    with pytest.raises(ConfigError, match="stage 2 only"):
        LlavaStageConfig(stage=1, fsdp=True)
    with pytest.raises(ConfigError, match="LoRA"):
        LlavaStageConfig(stage=2, fsdp=True, lora_r=8)


if __name__ == "__main__":
    worker(*sys.argv[1:])
