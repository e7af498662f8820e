"""LLaVA's own data as LLaVA ships it, under any chat template: image, multi-turn, text-only and missing-image
records; the answer mask from the LLM tokenizer's template (ChatML and a Llama-style one); pad-to-square."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bridge_helpers import smollm2_tokenizer, write_our_checkpoint
from PIL import Image

# A Llama-2-style template: no ChatML markers; an answer ends with the eos token.
LLAMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
         "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
         "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
ANSWERS = ["A red circle.", "Blue.", "Two.", "Paris is the capital.", "A green square."]


def _records(folder):
    Image.new("RGB", (48, 24), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(folder / "sq.png")
    (folder / "broken.png").write_bytes(b"not a png")
    records = [
        {"id": "img", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": ANSWERS[0]}]},
        {"id": "multi", "image": "sq.png", "conversations": [
            {"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": ANSWERS[1]},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": ANSWERS[2]}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": ANSWERS[3]}]},
        {"id": "no-token", "image": "sq.png", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": ANSWERS[4]}]},
        {"id": "gone", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
        {"id": "broken", "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    ]
    (folder / "mix.json").write_text(json.dumps(records))
    return folder / "mix.json"


def _assembled(tmp_path, template: str, tokenizer):
    from bridge.assemble import assemble
    from bridge.data import Collator
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower

    write_our_checkpoint(tmp_path / "enc")
    tower = load_tower(tmp_path / "enc")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=0, init_std=0.1), tokenizer, seed=0,
                                template=template)
    return model, processor, Collator(processor.tokenizer, processor.image_processor, tower.num_patches)


@pytest.mark.parametrize("style", ["chatml", "llama"])
def test_mix_records_train_skip_and_mask_only_the_answers(tmp_path, style):
    from bridge.config import LlavaStageConfig
    from bridge.data import LlavaJsonDataset
    from bridge.processor import IGNORE
    from bridge.train import train_stage

    tokenizer = smollm2_tokenizer()
    if style == "llama":
        tokenizer.chat_template = LLAMA
    model, processor, collate = _assembled(tmp_path, "chatml" if style == "chatml" else "auto", tokenizer)
    assert ("[INST]" in processor.tokenizer.chat_template) == (style == "llama")
    data = LlavaJsonDataset(_records(tmp_path), tmp_path)
    batch = collate([data[i] for i in range(len(data))])
    assert batch["skipped"] == {"missing_image": 1, "unreadable_image": 1} and batch["records"] == 6
    assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape[0] == 4  # text-only: no image
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n_image = [int((row == image_id).sum()) for row in batch["input_ids"]]
    assert n_image == [16, 16, 0, 16]  # one image each (inserted where the record had no <image>), none for text
    end = "<|im_end|>" if style == "chatml" else tokenizer.eos_token
    for row, labels, answers in zip(batch["input_ids"], batch["labels"], [[0], [1, 2], [3], [4]]):
        kept = processor.tokenizer.decode(labels[labels != IGNORE].tolist())
        assert kept.replace(" ", "") == "".join(f"{ANSWERS[a]}{end}" for a in answers).replace(" ", ""), kept
        prompt = processor.tokenizer.decode(row[labels == IGNORE].tolist())
        assert not any(ANSWERS[a] in prompt for a in answers)  # answers only in the labels
        if style == "llama":
            assert "[INST]" in prompt and "<|im_start|>" not in prompt.replace(tokenizer.bos_token or "", "")
    cfg = LlavaStageConfig(stage=2, steps=3, batch_size=6, lr=1e-3, progress=False, max_bad_fraction=0.5)
    summary = train_stage(model, data, collate, cfg, tmp_path / "s2")
    assert summary["steps"] == 3 and summary["records"] == 18 and summary["skipped"] == {
        "missing_image": 3, "unreadable_image": 3}
    assert np.isfinite(summary["final_loss"])


def test_too_many_missing_images_stop_the_stage_with_the_count(tmp_path):
    from bridge.config import LlavaStageConfig
    from bridge.data import LlavaJsonDataset
    from bridge.train import train_stage
    from encoder.data.loader import DataError

    model, _, collate = _assembled(tmp_path, "chatml", smollm2_tokenizer())
    data = LlavaJsonDataset(_records(tmp_path), tmp_path)  # 2 of 6 records unusable: a third
    cfg = LlavaStageConfig(stage=2, steps=20, batch_size=6, lr=1e-3, progress=False, max_bad_fraction=0.2)
    with pytest.raises(DataError, match=r"of \d+ records were unusable .*stage2.max_bad_fraction=0.2"):
        train_stage(model, data, collate, cfg, tmp_path / "s2")


def test_typed_content_renders_as_plain_text_under_the_llms_own_template():
    from bridge.processor import add_image_token, chat_template

    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = LLAMA
    add_image_token(tokenizer, chat_template(tokenizer))
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    plain = [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert tokenizer.apply_chat_template(typed, tokenize=False) == tokenizer.apply_chat_template(plain, tokenize=False)
    assert "[INST] <image>\nWhat colour? [/INST]" in tokenizer.apply_chat_template(plain, tokenize=False)
    fresh = smollm2_tokenizer()  # SmolLM2's own template (its default system turn) unless ChatML is asked
    assert "SmolLM" in chat_template(fresh) and "SmolLM" not in chat_template(fresh, "chatml")


def test_images_are_padded_to_a_square_with_the_mean_colour():
    from bridge.processor import make_image_processor

    mean = (0.5, 0.25, 0.75)
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    pad = make_image_processor(32, mean, (1.0, 1.0, 1.0), pad_to_square=True)(images=[image], return_tensors="pt")
    crop = make_image_processor(32, mean, (1.0, 1.0, 1.0))(images=[image], return_tensors="pt")
    top = pad["pixel_values"][0, :, 0, 16]  # the padded band above the image: the mean colour, normalised to ~0
    assert torch.allclose(top, torch.zeros(3), atol=0.02), top
    assert torch.allclose(crop["pixel_values"][0, :, 0, 16], 1 - torch.tensor(mean), atol=0.02)  # cropped: white
