"""LoRA in bridge stage 2 (peft): the adapters train and nothing else of the LLM does, merging them changes no
output, and the run's export is a plain LLaVA (no adapter left), the same whether exported at the end of the run or
rebuilt from the run folder (`ov2 bridge export`, which re-adds and merges the adapters)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bridge_helpers import smollm2_tokenizer, write_clip_folder, write_our_checkpoint, write_tiny_llama_folder

from tests.helpers import assert_close_scaled


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_adapters_train_alone_and_merge_without_changing_outputs(tmp_path, tokenizer):
    from bridge.assemble import assemble
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthInstructions
    from bridge.llm import tiny_llama
    from bridge.lora import add_lora, has_lora, merge_lora
    from bridge.towers import load_tower
    from bridge.train import train_stage

    write_our_checkpoint(tmp_path / "enc")
    tower = load_tower(tmp_path / "enc")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=0, init_std=0.1), tokenizer, seed=0)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    add_lora(model, r=4, alpha=8, seed=0)
    llm = model.model.language_model
    frozen = {n: p.detach().clone() for n, p in llm.named_parameters() if "lora_" not in n}
    cfg = LlavaStageConfig(stage=2, steps=16, batch_size=4, lr=3e-3, lora_r=4, progress=False)
    train_stage(model, SynthInstructions(16, image_size=32), collate, cfg, tmp_path / "s2")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    params = dict(llm.named_parameters())
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)  # the LLM's own weights never moved
    trained_b = [p for n, p in params.items() if "lora_B" in n]
    assert len(trained_b) == 2 * 7 and all(p.abs().max() > 0 for p in trained_b)  # B starts at zero: all trained
    batch = collate([SynthInstructions(4, image_size=32)[i] for i in range(4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        before = model(**inputs).logits
        merge_lora(model)
        after = model(**inputs).logits
    assert not has_lora(model) and type(model.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert_close_scaled(after, before, rel=1e-5, msg="merged logits")
    merged = dict(model.model.language_model.named_parameters())
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(frozen[q.replace(".weight", ".base_layer.weight")], merged[q])  # the adapter folded in


def test_a_lora_run_exports_a_plain_llava_and_rebuilds_the_same(tmp_path):
    from safetensors.torch import load_file

    from bridge.cli import main

    write_clip_folder(tmp_path / "clip")
    llm = write_tiny_llama_folder(tmp_path / "llm")
    out = tmp_path / "run"
    args = ["train", "--encoder", str(tmp_path / "clip"), "--llm", str(llm), "--out", str(out), "--stage1.steps=2",
            "--stage2.steps=3", "--stage1.batch_size=2", "--stage2.batch_size=2", "--stage1.progress=false",
            "--stage2.progress=false", "--eval_samples=0", "--stage1_samples=8", "--stage2_samples=8",
            "--stage2.lora_r=4", "--stage2.lr=1e-2"]
    assert main(args) == 0
    trained = load_file(str(out / "stage2" / "final.safetensors"))
    assert trained and all("lora_" in k or "multi_modal_projector" in k for k in trained)  # adapters + projector
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert not any("lora" in k for k in exported)
    assert main(["export", str(out), "--out", str(tmp_path / "re")]) == 0
    again = load_file(str(tmp_path / "re" / "model.safetensors"))
    assert again.keys() == exported.keys()
    for k in exported:
        assert_close_scaled(again[k], exported[k], rel=1e-6, msg=k)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(out / "model"))  # plain transformers reads it
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert main(args[:-2] + ["--stage2.lora_r=0"]) == 2  # another recipe into the same run is refused
