"""OpenVision (v1) and CLIP baselines: the contrastive loss against a direct computation, the text encoder, the v1
caption branch, and learning on built-in data (loss falls, zero-shot colour on held-out scenes above chance)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from encoder.checkpoint import load_model
from encoder.config import get_preset
from encoder.data.loader import Collate
from encoder.data.synth import COLOURS, SHAPES, make_scene
from encoder.data.transforms import eval_transform
from encoder.losses import CaptionLoss, ContrastiveLoss
from encoder.models import FAMILIES, build_losses, build_model, get_family, text_inputs
from encoder.models.ov2 import IGNORE, shift_targets
from encoder.tokenizer import PAD, get_tokenizer
from tests.helpers import assert_close_scaled, records, trained_run


def _small(family: str):
    cfg = get_preset(f"{family}-micro")
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
    assert_close_scaled(a["pooled"], b["pooled"], msg="padding to the longest text vs to the context")
    eos = (longest != PAD).sum(1) - 1
    assert torch.equal(a["pooled"], a["tokens"][torch.arange(3), eos])
    alone = model.text(tok(texts[:1], cfg.model.text.context))["pooled"]  # no dependence on the other rows
    assert_close_scaled(alone[0], a["pooled"][0], msg="one text alone vs in a batch")
    truncated = tok(["word " * 100], cfg.model.text.context)
    assert truncated.shape[1] == cfg.model.text.context and model.text(truncated)["pooled"].shape == (1, 64)


def test_openvision1_outputs_and_parallel_caption_targets():
    model, cfg = _small("ov1")
    assert model.decoder.embed is None  # queries, not tokens, enter the v1 decoder
    captions = ["a small red circle at the top left on a white background.", "the word \"apple\" in blue."]
    alts = ["red circle", "apple text written in blue letters"]
    items = [{"pixels": torch.randn(3, 16, 16), "caption": c, "alt": a, "sentence": c} for c, a in zip(captions, alts)]
    batch = {k: v for k, v in Collate(text_inputs(cfg.model))(items).items() if torch.is_tensor(v)}  # tensors only
    assert sorted(batch) == ["alt_tokens", "pixels", "sentence_tokens", "tokens"]
    tok = get_tokenizer()
    tokens = batch["tokens"]
    assert torch.equal(tokens, tok(captions, cfg.model.decoder.max_len))
    assert torch.equal(batch["alt_tokens"], tok(alts, cfg.model.text.context))
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
    assert_close_scaled(one[0], model(**batch)["caption_hidden"][0], msg="one row alone vs in a batch")
    # more targets than queries: cut to the queries
    long_tokens = torch.randint(3, 1000, (2, Q + 5))
    assert model(**{**batch, "tokens": long_tokens})["caption_targets"].shape == (2, Q)


def test_one_table_of_families_each_trained_from_a_collated_batch():
    assert list(FAMILIES) == ["ov2", "ov1", "clip"]
    with pytest.raises(ValueError, match="unknown model family 'ov3'; choose from: ov2, ov1, clip"):
        get_family("ov3")
    items = [{"pixels": torch.randn(3, 16, 16), "caption": f"a {c} circle. it is small.", "alt": f"{c} circle",
              "sentence": "it is small."} for c in ("red", "blue", "green")]
    for family in FAMILIES:
        model, cfg = _small(family)
        model_cls, loss_classes = get_family(family)
        assert type(model) is model_cls and [type(m) for m in build_losses(cfg)] == list(loss_classes)
        collated = Collate(text_inputs(cfg.model))(items)
        tensors = {k: v for k, v in collated.items() if torch.is_tensor(v)}  # the model takes tensors only
        assert set(tensors) == {"pixels", *text_inputs(cfg.model)}, family
        out = model(**tensors)
        terms = {}
        for loss in build_losses(cfg):
            terms.update(loss(out))
        total = sum(v for k, v in terms.items() if k.endswith("_loss"))
        assert torch.isfinite(total) and total > 0, (family, terms)


def test_presets_differ_only_by_family():
    ov2 = get_preset("ov2-l14")
    for family in ("ov1", "clip"):
        for size in ("micro", "tiny", "l14"):
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
    logged = records(run)
    first, last = logged[0], logged[-1]
    assert all(r["skipped"] == 0 for r in logged)
    assert last["contrastive_loss"] < first["contrastive_loss"] - 0.7, (first, last)  # starts at ~ln(64) = 4.16
    if family == "ov1":
        assert last["caption_loss"] < 0.4 * first["caption_loss"], (first, last)
    accuracy = builtin_zero_shot_colour(run)
    print(f"{family}: contrastive loss {first['contrastive_loss']:.3f} -> {last['contrastive_loss']:.3f}, "
          f"held-out zero-shot colour accuracy {accuracy:.3f} (chance {1 / len(COLOURS):.3f})")
    assert accuracy > 0.5  # chance 0.125 (200 scenes: +- 0.023); measured 0.89 (ov1) and 0.91 (clip)


@pytest.mark.slow  # a training and two 3000-image probes in fresh processes
def test_equal_budget_benchmark_writes_its_table(cli, tmp_path):
    out, table = tmp_path / "runs", tmp_path / "table.md"
    args = ["bench", "baselines", "--steps", "3", "--families", "clip", "--out", str(out), "--table", str(table)]
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == ["clip"] and rows["clip"]["peak_rss_mib"] > 100 and rows["clip"]["train_seconds"] > 0
    assert 0.1 < rows["clip"]["random_init_linear_probe_acc"] < 1 and rows["clip"]["zero_shot_method"] == "cosine"
    assert [r["step"] for r in records(str(out / "clip"))][-1] == 4  # 3 steps + the one-step second stage
    text = table.read_text()
    assert "| clip-micro |" in text and "3 steps, batch 64" in text and "| clip-micro |" in result.stdout
    again = cli(*args)  # a second run into the same folder refuses instead of mixing runs
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert json.loads((out / "results.json").read_text()) == rows
    other = cli("bench", "baselines", "--steps", "3", "--families", "clip", "--out", str(tmp_path / "other"), "--table",
                str(table))  # a new run may not overwrite an existing table without --force
    assert other.returncode == 2 and "--force" in other.stderr and table.read_text() == text
    assert not (tmp_path / "other").exists()
