"""Bridge: vision-tower adapters, exact encoder export, LLaVA assembly and export loadable by plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from bridge_helpers import (
    smollm2_tokenizer,
    write_clip_folder,
    write_openclip_folder,
    write_our_checkpoint,
    write_siglip_folder,
)
from PIL import Image

from tests.helpers import ROOT, assert_close_scaled

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def images(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# --- adapters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_hf_clip_adapter_matches_model_hidden_states(tmp_path, layer):
    from transformers import CLIPVisionModel

    from bridge.towers import load_tower

    write_clip_folder(tmp_path)
    tower = load_tower(tmp_path, feature_layer=layer)
    x = pixels()
    with torch.no_grad():
        ref = CLIPVisionModel.from_pretrained(tmp_path).eval()(pixel_values=x, output_hidden_states=True)
        got = tower(x)
    assert got.shape == (2, 16, 48) and tower.num_patches == 16 and tower.hidden_size == 48
    assert tower.strategy == "default" and tower.has_cls
    assert_close_scaled(got, ref.hidden_states[layer][:, 1:], rel=1e-5)


def test_hf_siglip_adapter_keeps_all_tokens(tmp_path):
    from transformers import SiglipVisionModel

    from bridge.towers import load_tower

    write_siglip_folder(tmp_path)
    tower = load_tower(tmp_path)
    x = pixels()
    with torch.no_grad():
        ref = SiglipVisionModel.from_pretrained(tmp_path).eval()(pixel_values=x, output_hidden_states=True)
        got = tower(x)
    assert got.shape == (2, 16, 48) and tower.strategy == "full" and not tower.has_cls
    assert_close_scaled(got, ref.hidden_states[-2], rel=1e-5)


@pytest.mark.parametrize("ln_pre", [False, True])
def test_openclip_adapter_matches_reference_trunk(tmp_path, ln_pre):
    from bridge.towers import load_tower

    visual = write_openclip_folder(tmp_path, ln_pre=ln_pre)
    tower = load_tower(tmp_path)
    x = pixels()
    with torch.no_grad():
        ref = visual.hidden_states(x)
        got = tower(x)
    assert type(tower.hf_model()).__name__ == ("CLIPVisionModel" if ln_pre else "ViTModel")
    assert got.shape == (2, 16, 48)
    assert_close_scaled(got, ref[-2][:, 1:], rel=1e-5)
    assert (got - ref[-1][:, 1:]).abs().max() > 1e-3  # the layer choice matters


def test_our_checkpoint_adapter_matches_vit(tmp_path):
    from bridge.towers import OursTower, load_tower

    model = write_our_checkpoint(tmp_path)
    tower = load_tower(tmp_path)
    assert isinstance(tower, OursTower)
    x = pixels()
    with torch.no_grad():
        ref = model.vit(x, output_hidden_states=True)["hidden_states"]
        got = tower(x)
    assert got.shape == (2, 16, 64) and tower.num_patches == 16
    assert_close_scaled(got, ref[-2][:, 1:], rel=1e-5)
    with pytest.raises(ValueError, match="feature_layer"):
        load_tower(tmp_path, feature_layer=9)


def test_image_processor_matches_encoder_eval_transform(tmp_path):
    from bridge.towers import load_tower
    from encoder.data.transforms import eval_transform

    write_our_checkpoint(tmp_path)
    tower = load_tower(tmp_path)
    rng = np.random.default_rng(0)
    for shape in [(32, 32, 3), (48, 40, 3)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        ours = eval_transform(32)(image)
        hf = tower.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert hf.shape == ours.shape
        tol = 1e-5 if shape[0] == shape[1] == 32 else 0.05  # resampling rounds differently by at most 1/255-ish
        assert (hf - ours).abs().mean() < tol


# --- encoder export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["openvision", "clip"])
def test_export_encoder_loads_in_transformers_exactly(tmp_path, layout):
    from transformers import AutoImageProcessor, CLIPVisionModel, ViTModel

    from bridge.cli import export_encoder_main

    model = write_our_checkpoint(tmp_path / "ckpt", layout=layout)
    assert export_encoder_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--layout", layout]) == 0
    cls = ViTModel if layout == "openvision" else CLIPVisionModel
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    x = pixels()
    with torch.no_grad():
        ours = model.vit(x, output_hidden_states=True)["hidden_states"]
        theirs = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert_close_scaled(b, a, rel=1e-5)
    assert AutoImageProcessor.from_pretrained(tmp_path / "hf").crop_size["height"] == 32
    wrong = "clip" if layout == "openvision" else "openvision"
    assert export_encoder_main([str(tmp_path / "ckpt"), str(tmp_path / "hf2"), "--layout", wrong]) == 2


# --- processor and assembly -------------------------------------------------------------------------------


def test_chat_template_and_answer_labels(tokenizer):
    from bridge.processor import IGNORE, add_image_token, encode_conversation, render_segments, to_messages

    image_id = add_image_token(tokenizer)
    conv = [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "blue"}]
    messages = to_messages(conv)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "".join(s for s, _ in render_segments(tokenizer, messages)) == rendered
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the star?"}], tokenize=False)
    enc = encode_conversation(tokenizer, conv, num_image_tokens=5)
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    assert ids == tokenizer.encode(rendered.replace("<image>", "<image>" * 5), add_special_tokens=False)
    assert ids.count(image_id) == 5
    answer = tokenizer.decode([t for t in labels if t != IGNORE])
    assert answer == "red<|im_end|>blue<|im_end|>"


def _assembled(tmp_path, tokenizer, layout="openvision"):
    from bridge.assemble import assemble
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower

    write_our_checkpoint(tmp_path / f"ckpt-{layout}", layout=layout)
    tower = load_tower(tmp_path / f"ckpt-{layout}")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=1, init_std=0.3), tokenizer, seed=1)
    with torch.no_grad():  # a non-trivial projector so that generations depend on the image
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    return model, processor, tower


def test_assembled_model_uses_tower_features(tmp_path, tokenizer):
    model, processor, tower = _assembled(tmp_path, tokenizer)
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == 16
    x = pixels()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x).pooler_output
        ref = model.model.multi_modal_projector(tower(x))
    assert_close_scaled(torch.stack(list(feats)), ref, rel=1e-5)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True)
    inputs = processor(images=images(1), text=[text], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == tower.num_patches


FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    out = {}
    for name, folder in json.loads(sys.argv[1]).items():
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
        rng = np.random.default_rng(0)
        ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
        rows = []
        for im, q in zip(ims, ["What colour is the star?", "Describe it."]):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            text = processor.apply_chat_template(msgs, add_generation_prompt=True)
            inputs = processor(images=im, text=text, return_tensors="pt")
            gen = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            rows.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
        out[name] = {"tokens": rows, "vision": type(model.model.vision_tower).__name__}
    leaked = [m for m in ("bridge", "encoder", "ov2") if m in sys.modules]
    print(json.dumps({"out": out, "leaked": leaked}))
    """
)


@pytest.mark.slow
def test_exported_llava_generates_same_tokens_in_fresh_process(tmp_path, tokenizer):
    from bridge.evaluate import generate_ids
    from bridge.export import export_llava

    expected, folders = {}, {}
    for layout in ("openvision", "clip"):
        model, processor, _ = _assembled(tmp_path, tokenizer, layout)
        rng = np.random.default_rng(0)
        ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
        rows = []
        for im, q in zip(ims, ["What colour is the star?", "Describe it."]):
            rows += generate_ids(model, processor, [im], [q], max_new_tokens=12)
        assert any(len(set(r)) > 1 for r in rows), "degenerate generations make the comparison weak"
        expected[layout] = rows
        folders[layout] = str(export_llava(model, processor, tmp_path / f"llava-{layout}"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(folders)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["out"]["openvision"]["vision"] == "ViTModel"
    assert result["out"]["clip"]["vision"] == "CLIPVisionModel"
    eos = tokenizer.eos_token_id
    for layout, rows in expected.items():
        fresh = [r[: r.index(eos)] if eos in r else r for r in result["out"][layout]["tokens"]]
        assert fresh == rows, layout


def test_keep_layers_is_the_first_layers_and_saves_as_a_plain_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from bridge.llm import keep_layers, tiny_llama
    from ov2.config import ConfigError

    model = tiny_llama(tokenizer, layers=3, init_std=0.3).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        h2 = model(ids, output_hidden_states=True).hidden_states[2]  # after the first two decoder layers
        expected = model.lm_head(model.model.norm(h2))
    keep_layers(model, 2)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    with torch.no_grad():
        assert_close_scaled(model(ids).logits, expected, rel=1e-5)
    model.save_pretrained(tmp_path / "cut")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    assert again.config.num_hidden_layers == 2
    with torch.no_grad():
        assert_close_scaled(again(ids).logits, expected, rel=1e-5)
        assert again.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)  # the KV cache has 2 layers
    with pytest.raises(ConfigError, match="llm_layers"):
        keep_layers(model, 3)


RACE_CHILD = """
import os, sys, time
from pathlib import Path
import bridge.llm as llm

cache, me = Path(sys.argv[1]), sys.argv[2]

def convert(folder):  # a stand-in for the GGUF conversion (~15 s): slow enough that the processes overlap
    with open(cache / "conversions.log", "a") as log:
        log.write(me + "\\n")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    time.sleep(0.5)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)

llm._convert_smollm2 = convert
(cache / f"ready-{me}").touch()
while not (cache / "go").exists():
    time.sleep(0.01)
out = llm.smollm2_folder()
for _ in range(10):  # what the caller reads next stays whole while the other processes finish
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "model.safetensors").stat().st_size == 1000
    time.sleep(0.05)
"""


def test_smollm2_is_converted_once_by_processes_asking_together(tmp_path):
    """Every rank of a torchrun asks for the converted SmolLM2 at the same moment: one converts, the others wait and
    read the finished folder; none fails, none reads a folder that another removes or renames."""
    import time

    env = {**os.environ, "PYTHONPATH": ROOT, "OV2_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", RACE_CHILD, str(tmp_path), str(i)], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline and \
            all(c.poll() is None for c in children):
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
    assert len((tmp_path / "conversions.log").read_text().split()) == 1
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == [".smollm2-135m-instruct.lock",
                                                                    "smollm2-135m-instruct"]
