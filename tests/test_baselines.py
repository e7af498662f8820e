"""OpenVision (v1) and CLIP baselines: the contrastive loss against a direct computation, the text encoder, the v1
caption branch, and learning on built-in data (loss falls, zero-shot colour on held-out scenes above chance)."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baselines import SMALL, recipe
from encoder.checkpoint import latest_checkpoint, load_model
from encoder.config import apply_overrides, get_preset
from encoder.contrastive import ContrastiveLoss
from encoder.data.synth import COLOURS, SHAPES, make_scene
from encoder.data.transforms import eval_transform
from encoder.losses import CaptionLoss
from encoder.models import build_losses, build_model
from encoder.ov2 import IGNORE, shift_targets
from encoder.tokenizer import PAD, get_tokenizer

# Learning runs: the equal-budget recipe of benchmarks/baselines.py (single-object shape scenes plus 75 %
# Fashion-MNIST train images, 32 px, patch 4, 400 steps of 64); tests/test_fashion_mnist.py probes the same runs.
LEARN = [*SMALL, *recipe()]


def trained_run(tmp_path_factory, family: str) -> str:
    """A run folder of `family`-tiny trained with LEARN, shared by every test module of the session."""
    from encoder.train import train

    out = str(tmp_path_factory.getbasetemp() / "trained" / family)
    if latest_checkpoint(out) is None:
        train(apply_overrides(get_preset(f"{family}-tiny"), LEARN), out)
    return out


def _records(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _small(family: str):
    cfg = apply_overrides(get_preset(f"{family}-tiny"), SMALL)
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


# --- contrastive loss ----------------------------------------------------------------------------------


def _direct_clip_loss(image, text, scale):
    image, text = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    logits = scale * image @ text.T
    n = len(logits)
    rows = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(n)) / n
    cols = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(n)) / n
    return (rows + cols) / 2


def test_contrastive_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    image, alt, sentence = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(3))
    loss = ContrastiveLoss().double()
    out = loss({"image_embeds": image, "text_embeds": [alt, sentence]})
    scale = 1 / 0.07
    expected = (_direct_clip_loss(image, alt, scale) + _direct_clip_loss(image, sentence, scale)) / 2
    torch.testing.assert_close(out["contrastive_loss"], expected)
    assert out["logit_scale"].item() == pytest.approx(scale)
    single = loss({"image_embeds": image, "text_embeds": alt})["contrastive_loss"]  # CLIP: one text
    torch.testing.assert_close(single, _direct_clip_loss(image, alt, scale))
    out["contrastive_loss"].backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs() > 0
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))  # clamped at 100
    clamped = loss({"image_embeds": image, "text_embeds": [alt]})
    assert clamped["logit_scale"].item() == pytest.approx(100.0)
    torch.testing.assert_close(clamped["contrastive_loss"], _direct_clip_loss(image, alt, 100.0))


# --- towers --------------------------------------------------------------------------------------------


def test_text_encoder_pools_at_eos_and_ignores_padding():
    model, cfg = _small("clip")
    model.eval()
    texts = ["a red circle", "two small blue squares at the top left on a gray background", "bag"]
    tok = get_tokenizer()
    longest = tok(texts, cfg.model.text.context)
    full = tok(texts, cfg.model.text.context, pad_to_max=True)
    assert longest.shape[1] < full.shape[1] == cfg.model.text.context
    a, b = model.text(longest), model.text(full)
    torch.testing.assert_close(a["pooled"], b["pooled"], rtol=1e-5, atol=1e-5)
    eos = (longest != PAD).sum(1) - 1
    torch.testing.assert_close(a["pooled"], a["tokens"][torch.arange(3), eos])
    alone = model.text(tok(texts[:1], cfg.model.text.context))["pooled"]  # no dependence on the other rows
    torch.testing.assert_close(alone[0], a["pooled"][0], rtol=1e-5, atol=1e-5)
    truncated = tok(["word " * 100], cfg.model.text.context)
    assert truncated.shape[1] == cfg.model.text.context and model.text(truncated)["pooled"].shape == (1, 64)


def test_openvision1_outputs_and_parallel_caption_targets():
    model, cfg = _small("ov1")
    assert model.decoder.embed is None  # queries, not tokens, enter the v1 decoder
    captions = ["a small red circle at the top left on a white background.", "the word \"apple\" in blue."]
    tokens = get_tokenizer()(captions, cfg.model.decoder.max_len)
    batch = {"pixels": torch.randn(2, 3, 16, 16), "tokens": tokens, "captions": captions,
             "alts": ["red circle", "apple text written in blue letters"], "sentences": captions}
    out = model(**batch)
    Q, D = cfg.model.num_queries, cfg.model.decoder.width
    assert out["caption_hidden"].shape == (2, Q, D) and out["caption_targets"].shape == (2, Q)
    _, shifted = shift_targets(tokens)
    T = shifted.shape[1]
    assert T < Q and torch.equal(out["caption_targets"][:, :T], shifted)
    assert (out["caption_targets"][:, T:] == IGNORE).all()
    assert len(out["text_embeds"]) == 2 and out["image_embeds"].shape == (2, cfg.model.embed_dim)
    losses = build_losses(cfg)
    assert [type(m).__name__ for m in losses] == ["CaptionLoss", "ContrastiveLoss"]
    terms = {}
    for loss in losses:
        terms.update(loss(out))
    assert set(terms) == {"caption_loss", "contrastive_loss", "logit_scale"}
    (terms["caption_loss"] + terms["contrastive_loss"]).backward()
    for name in ("queries", "text_proj.weight", "image_proj.weight", "text.embed.weight", "vit.norm.weight",
                 "decoder.head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # the query hidden states of a row do not depend on how much the other rows' alt-texts were padded
    model.eval()
    one = model(**{k: v[:1] for k, v in batch.items()})["caption_hidden"]
    torch.testing.assert_close(one[0], model(**batch)["caption_hidden"][0], rtol=1e-4, atol=1e-5)
    # more targets than queries: cut to the queries
    long_tokens = torch.randint(3, 1000, (2, Q + 5))
    assert model(**{**batch, "tokens": long_tokens})["caption_targets"].shape == (2, Q)


def test_presets_differ_only_by_family():
    ov2 = get_preset("ov2-l14")
    for family in ("ov1", "clip"):
        for size in ("tiny", "l14"):
            cfg, same = get_preset(f"{family}-{size}"), get_preset(f"ov2-{size}")
            assert cfg.model.vit == same.model.vit and cfg.stages == same.stages
    assert get_preset("ov1-l14").model.num_queries == 128 and get_preset("ov1-l14").model.text.context == 80
    assert get_preset("ov1-l14").model.decoder == ov2.model.decoder
    assert [type(m).__name__ for m in build_losses(get_preset("clip-tiny"))] == ["ContrastiveLoss"]
    clip, _ = _small("clip")
    assert not hasattr(clip, "decoder")
    assert isinstance(CaptionLoss(), torch.nn.Module)


# --- learning on built-in data -------------------------------------------------------------------------


def builtin_zero_shot_colour(run: str, n: int = 200) -> float:
    """Colour accuracy on held-out single-object scenes: cosine to prompts averaged over shapes and sizes."""
    model, cfg = load_model(run)
    scenes = [make_scene(999, i, 64, kinds=("shapes",), max_groups=1) for i in range(n)]  # held-out seed
    image = model.encode_image(torch.stack([eval_transform(cfg.stages[-1].image_size)(s.image) for s in scenes]))
    prompts = torch.stack([F.normalize(model.encode_text(
        [f"a {size} {colour} {shape}" for size in ("small", "large") for shape in SHAPES]).mean(0), dim=0)
        for colour in COLOURS])
    predicted = (image @ prompts.T).argmax(1).tolist()
    return sum(list(COLOURS)[p] == s.objects[0]["colour"] for p, s in zip(predicted, scenes)) / n


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "ov1"])
def test_baseline_learns_on_builtin_data(tmp_path_factory, family):
    run = trained_run(tmp_path_factory, family)
    records = _records(run)
    first, last = records[0], records[-1]
    assert all(r["skipped"] == 0 for r in records)
    assert last["contrastive_loss"] < first["contrastive_loss"] - 0.7, (first, last)  # starts at ~ln(64) = 4.16
    if family == "ov1":
        assert last["caption_loss"] < 0.4 * first["caption_loss"], (first, last)
    accuracy = builtin_zero_shot_colour(run)
    print(f"{family}: contrastive loss {first['contrastive_loss']:.3f} -> {last['contrastive_loss']:.3f}, "
          f"held-out zero-shot colour accuracy {accuracy:.3f} (chance {1 / len(COLOURS):.3f})")
    assert accuracy > 0.5  # chance 0.125 (200 scenes: +- 0.023); measured 0.89 (ov1) and 0.91 (clip)


def test_equal_budget_benchmark_writes_its_table(tmp_path):
    from benchmarks.baselines import main

    out, table = tmp_path / "runs", tmp_path / "table.md"
    assert main(["--steps", "3", "--families", "clip", "--out", str(out), "--table", str(table)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == ["clip"] and rows["clip"]["peak_rss_mib"] > 100 and rows["clip"]["train_seconds"] > 0
    assert 0.1 < rows["clip"]["random_init_linear_probe_acc"] < 1 and rows["clip"]["zero_shot_method"] == "cosine"
    text = table.read_text()
    assert "| clip-tiny |" in text and "3 steps, batch 64" in text
    with pytest.raises(SystemExit):  # a second run into the same folder refuses instead of mixing runs
        main(["--steps", "3", "--families", "clip", "--out", str(out), "--table", str(table)])
