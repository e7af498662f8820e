"""Bridge training: answer-only loss, stage 1 / stage 2 on built-in data with a tiny Llama, exact resume, data, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from bridge_helpers import smollm2_tokenizer, write_clip_folder, write_our_checkpoint, write_tiny_llama_folder
from PIL import Image

from tests.helpers import linear_calls

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_our_checkpoint(folder)
    return folder


def build(ckpt, tokenizer, seed=0):
    from bridge.assemble import assemble
    from bridge.data import Collator
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower

    tower = load_tower(ckpt)
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=seed, init_std=0.1), tokenizer, seed=seed)
    return model, Collator(processor.tokenizer, processor.image_processor, tower.num_patches), processor


def test_answer_loss_matches_transformers_shifted_loss(ckpt, tokenizer):
    from bridge.data import SynthInstructions
    from bridge.loss import AnswerLoss

    model, collate, _ = build(ckpt, tokenizer)
    batch = collate([SynthInstructions(4, image_size=32)[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and (batch["attention_mask"] == 0).any()  # padding happened
    ours = AnswerLoss()(model, batch)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours["lm_loss"], ref, rtol=1e-5, atol=1e-5)
    answers = (batch["labels"] != -100).sum()
    assert ours["tokens"] == answers  # every answer token is a target (none is the first token)


def test_synthetic_sets_are_deterministic_and_disjoint():
    from bridge.data import HELDOUT_SEED, SynthCaptions, SynthInstructions

    a, b = SynthInstructions(50, image_size=32), SynthInstructions(50, image_size=32)
    assert [a[i]["question"] for i in range(50)] == [b[i]["question"] for i in range(50)]
    types = {a[i]["type"] for i in range(50)}
    known = {"colour", "shape", "yesno", "choice", "count", "position", "text", "text_colour", "chart", "chart_max"}
    assert types <= known and len(types) >= 6
    held = SynthInstructions(50, seed=HELDOUT_SEED, image_size=32)
    train_pixels = {np.asarray(a[i]["image"]).tobytes() for i in range(50)}
    assert not any(np.asarray(held[i]["image"]).tobytes() in train_pixels for i in range(50))
    cap = SynthCaptions(3, image_size=32)[0]
    assert cap["conversations"][0]["value"].startswith("<image>\n") and cap["conversations"][1]["value"]
    from encoder.data.synth import COLOURS

    only = SynthInstructions(20, image_size=32, kinds=("shapes",), types=("colour",))
    assert all(only[i]["type"] == "colour" and only[i]["answer"] in COLOURS for i in range(20))


def test_multi_turn_instructions(tokenizer, ckpt):
    """turns=4: the single-turn question first, then questions of other types about the same image (which appears
    once, in the first turn); every answer, and only the answers, are targets."""
    from bridge.data import SynthInstructions

    one, four = SynthInstructions(30, image_size=32), SynthInstructions(30, image_size=32, turns=4)
    _, collate, _ = build(ckpt, tokenizer)
    for i in range(30):
        a, b = one[i], four[i]
        assert b["conversations"][:2] == a["conversations"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        humans, answers = b["conversations"][::2], [t["value"] for t in b["conversations"][1::2]]
        assert [h["value"].count("<image>") for h in humans] == [1] + [0] * (len(humans) - 1)
        assert len(set(h["value"] for h in humans)) == len(humans) <= 4
        labels = collate([b])["labels"][0]
        assert tokenizer.decode(labels[labels != -100].tolist()) == "".join(f"{x}<|im_end|>" for x in answers)
    assert max(len(four[i]["conversations"]) for i in range(30)) == 8  # shape scenes hold four types and more


def test_llava_json_reader(tmp_path, tokenizer, ckpt):
    from bridge.data import LlavaJsonDataset

    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "a.png")
    records = [{"id": "x1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    data = LlavaJsonDataset(tmp_path / "d.json")
    assert len(data) == 1 and data[0]["image"].size == (40, 32)
    _, collate, _ = build(ckpt, tokenizer)
    batch = collate([data[0]])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    kept = batch["labels"][batch["labels"] != -100].tolist()
    assert tokenizer.decode(kept) == "Red.<|im_end|>"


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_stage1_and_stage2_lower_the_loss(tmp_path, ckpt, tokenizer):
    from bridge.config import LlavaStageConfig
    from bridge.data import SynthCaptions, SynthInstructions
    from bridge.train import train_stage

    model, collate, _ = build(ckpt, tokenizer)
    llm_before = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    tower_before = next(model.model.vision_tower.parameters()).clone()
    s1 = LlavaStageConfig(stage=1, steps=24, batch_size=4, lr=3e-3, progress=False, warmup_ratio=0.1)
    summary = train_stage(model, SynthCaptions(16, image_size=32), collate, s1, tmp_path / "s1")
    losses = _losses(tmp_path / "s1")
    assert len(losses) == 24 and summary["steps"] == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    assert torch.equal(llm_before, model.model.language_model.layers[0].mlp.up_proj.weight)  # LLM frozen
    s2 = LlavaStageConfig(stage=2, steps=16, batch_size=4, grad_accum=2, lr=2e-3, progress=False)
    train_stage(model, SynthInstructions(16, image_size=32), collate, s2, tmp_path / "s2")
    losses = _losses(tmp_path / "s2")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    assert not torch.equal(llm_before, model.model.language_model.layers[0].mlp.up_proj.weight)  # LLM trained
    assert torch.equal(tower_before, next(model.model.vision_tower.parameters()))  # tower frozen
    metrics = json.loads((tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens", "elapsed_s", "peak_rss_mb"} <= set(metrics)


def test_resume_continues_exactly(tmp_path, ckpt, tokenizer):
    from bridge.config import LlavaStageConfig
    from bridge.data import SynthInstructions
    from bridge.train import train_stage, trainable_state

    data = SynthInstructions(12, image_size=32)
    cfg = LlavaStageConfig(stage=2, steps=6, batch_size=3, lr=1e-3, ckpt_every=2, progress=False, unfreeze_vision=True,
                           vision_lr=1e-4)
    straight, collate, _ = build(ckpt, tokenizer)
    train_stage(straight, data, collate, cfg, tmp_path / "a")

    first, collate, _ = build(ckpt, tokenizer)
    partial = train_stage(first, data, collate, cfg, tmp_path / "b", stop_after=3)
    assert partial["steps"] == 3 and not (tmp_path / "b" / "done.json").exists()
    # the interrupted run's next steps would have been written but lost: resume from the step-3 checkpoint
    resumed, collate, _ = build(ckpt, tokenizer)
    train_stage(resumed, data, collate, cfg, tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys() and any("vision_tower" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished stage is skipped and its weights restored
    again, collate, _ = build(ckpt, tokenizer)
    train_stage(again, data, collate, cfg, tmp_path / "b")
    assert all(torch.equal(v, trainable_state(again)[k]) for k, v in a.items())


def test_projector_learning_rate_of_its_own(tmp_path, ckpt, tokenizer):
    from bridge.config import LlavaStageConfig
    from bridge.data import SynthInstructions
    from bridge.train import train_stage

    model, collate, _ = build(ckpt, tokenizer)
    llm0 = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    proj0 = model.model.multi_modal_projector.linear_2.weight.clone()
    cfg = LlavaStageConfig(stage=2, steps=1, batch_size=2, lr=1e-5, projector_lr=1e-2, warmup_ratio=0.0, ckpt_every=1,
                           progress=False)
    train_stage(model, SynthInstructions(4, image_size=32), collate, cfg, tmp_path / "s2")
    from ov2.checkpoint import step_path

    groups = torch.load(step_path(tmp_path / "s2", 1) / "optimizer.pt")["param_groups"]
    assert {g["name"]: g["initial_lr"] for g in groups} == {"projector": 1e-2, "llm": 1e-5}
    # AdamW's first step moves every weight by about its LR: 1e-2 for the projector, 1e-5 for the LLM
    proj_step = (model.model.multi_modal_projector.linear_2.weight - proj0).abs().max()
    llm_step = (model.model.language_model.layers[0].mlp.up_proj.weight - llm0).abs().max()
    assert 5e-3 < proj_step < 2e-2 and 5e-6 < llm_step < 2e-5, (proj_step, llm_step)


def test_bf16_option_trains(tmp_path, ckpt, tokenizer):
    from bridge.config import LlavaStageConfig
    from bridge.data import SynthInstructions
    from bridge.train import train_stage

    model, collate, _ = build(ckpt, tokenizer)
    cfg = LlavaStageConfig(stage=1, steps=2, batch_size=2, bf16=True, progress=False)
    calls, summary = linear_calls(
        lambda: train_stage(model, SynthInstructions(4, image_size=32), collate, cfg, tmp_path / "bf16"))
    assert np.isfinite(summary["final_loss"])
    device = next(model.parameters()).device.type
    # the trained projector (and the LLM it feeds) run in bf16 under autocast on the model's device
    assert len(calls) > 2 * 4 and set(calls) == {(torch.bfloat16, device, True)}, set(calls)


def test_cli_train_export_chat(tmp_path, capsys):
    from bridge.cli import main

    enc = tmp_path / "clip"
    write_clip_folder(enc)
    llm = write_tiny_llama_folder(tmp_path / "llm")
    out = tmp_path / "run"
    args = ["train", "--encoder", str(enc), "--llm", str(llm), "--out", str(out), "--stage1.steps=2",
            "--stage2.steps=2", "--stage1.batch_size=2", "--stage2.batch_size=2", "--stage1.progress=false",
            "--stage2.progress=false", "--eval_samples=4", "--stage1_samples=8", "--stage2_samples=8"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage2"]["steps"] == 2 and 0 <= summary["heldout"]["accuracy"] <= 1
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "re")]) == 0
    from safetensors.torch import load_file

    exported, original = load_file(str(tmp_path / "re" / "model.safetensors")), load_file(
        str(out / "model" / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert json.loads((tmp_path / "re" / "config.json").read_text())["model_type"] == "llava"
    Image.new("RGB", (32, 32), (20, 20, 200)).save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "re"), str(tmp_path / "img.png"), "What colour?", "--max-new-tokens=3"]) == 0
    printed = capsys.readouterr()
    assert printed.out.endswith("\n") and printed.out.count("\n") == 1 and "Traceback" not in printed.err  # one answer
    for bad, word in (("--stage1.nope=3", "nope"), ("--stage1.steps=0", "steps")):
        assert main(["train", "--encoder", str(enc), "--out", str(out), bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert json.loads((out / "summary.json").read_text()) == summary  # the refused runs left the run alone


def test_config_saved_with_the_old_save_every_key_still_loads(tmp_path):
    """`save_every` (older runs) is today's `ckpt_every`: a saved run or stage config holding it loads and resumes."""
    from dataclasses import asdict

    import yaml

    from bridge.config import RESUME_SAFE, BridgeConfig, LlavaStageConfig, upgrade
    from bridge.pipeline import check_same_run, saved_config
    from ov2.config import ConfigError
    from ov2.resume import check_resume

    cfg = BridgeConfig(encoder="preset:ov2-micro", out=str(tmp_path), stage1=LlavaStageConfig(stage=1, ckpt_every=7))
    old = asdict(cfg)
    for stage in ("stage1", "stage2"):
        old[stage]["save_every"] = old[stage].pop("ckpt_every")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert BridgeConfig.from_dict(saved_config(tmp_path)) == cfg
    check_same_run(cfg)  # the same run: no complaint
    check_resume(tmp_path, cfg.stage1, 3, upgrade(old["stage1"]), safe=RESUME_SAFE)
    with pytest.raises(ConfigError, match="cannot change the recipe: lr"):
        check_resume(tmp_path, LlavaStageConfig(stage=1, lr=0.5), 3, upgrade(old["stage1"]), safe=RESUME_SAFE)
