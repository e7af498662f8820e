"""`ov2 bench image-use`: option likelihood with each question's own image vs a shuffled one, on exported LLaVA
folders; a model blind by construction scores the same both ways."""

import json

import pytest
from bridge_helpers import write_tiny_llava

from tests.helpers import run_inprocess


@pytest.mark.slow  # two tiny LLaVA folders scored
def test_image_use_is_equal_for_a_blind_model_and_refuses_bad_input(tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path / "llava"
    write_tiny_llava(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.zero_()  # every image token the same vector: blind
    blind = tmp_path / "blind"
    model.save_pretrained(blind)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            (blind / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "use"
    result = run_inprocess("bench", "image-use", str(folder), str(blind), "--n", "6", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "use.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [6, 6]
    seeing, blinded = rows
    assert blinded["nll"] == blinded["nll_shuffled"] and blinded["accuracy"] == blinded["accuracy_shuffled"]
    assert seeing["nll"] != seeing["nll_shuffled"]  # the tiny random model's answers do depend on the image
    bad = run_inprocess("bench", "image-use", str(tmp_path), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not an exported model folder" in bad.stderr
    bad = run_inprocess("bench", "image-use", str(folder), "--task", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not a built-in task" in bad.stderr
