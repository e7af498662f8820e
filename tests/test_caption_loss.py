"""The vision-dependence measure (bridge.evaluate.caption_loss): stage 1's caption loss on unseen scenes separates a
bridge whose image tokens carry the scene from a blind one, on a tiny case that learns; ov2 run tables it."""

from __future__ import annotations

import math

from bridge_helpers import smollm2_tokenizer, write_our_checkpoint


def _stage1(tmp_path, blind: bool):
    from bridge.assemble import assemble, make_blind
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthCaptions
    from bridge.evaluate import caption_loss
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower
    from bridge.train import train_stage

    tokenizer = smollm2_tokenizer()
    tower = load_tower(tmp_path / "ckpt")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=0, init_std=0.1), tokenizer, seed=0)
    if blind:
        make_blind(model)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    train = SynthCaptions(256, image_size=32, kinds=("shapes",))
    unseen = SynthCaptions(48, seed=977_000_014, image_size=32, kinds=("shapes",))
    before = caption_loss(model, collate, unseen, n=48, progress=False)
    cfg = LlavaStageConfig(stage=2, steps=60, batch_size=8, lr=3e-3, progress=False, bf16="false", warmup_ratio=0.0)
    train_stage(model, train, collate, cfg, tmp_path / ("blind" if blind else "sighted"))
    return before, caption_loss(model, collate, unseen, n=48, progress=False)


def test_caption_loss_separates_a_sighted_bridge_from_a_blind_one(tmp_path):
    """The same tiny LLaVA trained the same way on shape captions, once with its image and once blind: both learn
    the captions' words, but only the sighted one learns which colours and shapes are there, so its loss on unseen
    scenes ends lower than the blind one's by several standard errors."""
    write_our_checkpoint(tmp_path / "ckpt")
    before, sighted = _stage1(tmp_path, blind=False)
    _, blind = _stage1(tmp_path, blind=True)
    assert sighted["n"] == blind["n"] == 48
    assert sighted["loss"] < before["loss"] and blind["loss"] < before["loss"]  # both learnt
    gap = blind["loss"] - sighted["loss"]
    assert gap > 4 * math.hypot(sighted["stderr"], blind["stderr"]), (sighted, blind)


def test_results_table_holds_each_bridges_caption_loss(tmp_path):
    from benchmarks.runner.results import _bridge_rows

    rows = _bridge_rows({"caption_loss": {"loss": 1.5, "stderr": 0.1, "n": 64}})
    assert rows == [{"task": "caption_loss", "metric": "heldout_nll", "value": 1.5, "stderr": 0.1, "n": 64,
                     "chance": rows[0]["chance"], "primary": False}]
    assert math.isnan(rows[0]["chance"])
    assert _bridge_rows({"stage1": {}}) == [] and _bridge_rows({"caption_loss": "broken"}) == []
