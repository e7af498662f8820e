"""OpenVision 2 model: prefix-LM mask, random token keep, caption loss = F.cross_entropy, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from encoder.decoder import DecoderConfig, PrefixDecoder
from encoder.losses import CaptionLoss
from encoder.ov2 import IGNORE, OpenVision2, keep_random_tokens, shift_targets
from encoder.tokenizer import EOS, PAD, get_tokenizer
from encoder.vit import ViTConfig

VIT = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
DEC = DecoderConfig(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=500, max_len=16)


def _decoder(mask="prefix"):
    torch.manual_seed(0)
    return PrefixDecoder(DecoderConfig(**{**DEC.__dict__, "mask": mask})).eval()


def test_prefix_lm_text_is_causal_and_image_ignores_text():
    dec = _decoder()
    prefix = torch.randn(2, 5, 32)
    text = torch.randn(2, 7, 32)
    changed = text.clone()
    changed[:, 4] += torch.randn(32)  # change a later text token
    a = dec(prefix, text, return_prefix=True)
    b = dec(prefix, changed, return_prefix=True)
    assert torch.equal(a[:, : 5 + 4], b[:, : 5 + 4])  # image tokens and earlier text positions unchanged
    assert not torch.allclose(a[:, 5 + 4:], b[:, 5 + 4:])  # the changed position and later ones do change
    # image-token outputs do not depend on any text at all
    c = dec(prefix, torch.randn(2, 3, 32), return_prefix=True)
    torch.testing.assert_close(a[:, :5], c[:, :5], rtol=0, atol=1e-6)


def test_image_tokens_see_each_other_under_prefix_lm_but_not_under_causal():
    prefix = torch.randn(1, 5, 32)
    changed = prefix.clone()
    changed[:, 4] += torch.randn(32)  # change the last image token
    text = torch.randn(1, 3, 32)
    for mask, first_changes in (("prefix", True), ("causal", False)):
        dec = _decoder(mask)
        a, b = dec(prefix, text, return_prefix=True), dec(changed, text, return_prefix=True)
        assert (not torch.allclose(a[:, 0], b[:, 0])) == first_changes, mask


def test_keep_count_no_replacement_and_per_sample_randomness():
    B, N, D = 6, 64, 3
    ids = torch.arange(N, dtype=torch.float32)[None, :, None].expand(B, N, D)
    kept = keep_random_tokens(ids, 0.35)
    assert kept.shape == (B, math.floor(N * 0.35), D)
    rows = [tuple(sorted(kept[b, :, 0].long().tolist())) for b in range(B)]
    assert all(len(set(r)) == len(r) for r in rows)  # without replacement
    assert len(set(rows)) == B  # each sample draws its own subset
    assert keep_random_tokens(ids, 1.0).shape == ids.shape


def test_keep_only_in_training_unless_asked():
    torch.manual_seed(0)
    model = OpenVision2(VIT, DEC, keep_ratio=0.25)
    pixels = torch.randn(2, 3, 32, 32)
    assert model.train().image_prefix(pixels).shape[1] == 4  # floor(16 * 0.25)
    assert model.eval().image_prefix(pixels).shape[1] == 16
    model.keep_at_eval = True
    assert model.eval().image_prefix(pixels).shape[1] == 4


def test_targets_shift_once_and_ignore_pad():
    tokens = torch.tensor([[1, 7, 8, EOS, PAD, PAD]])
    inputs, targets = shift_targets(tokens)
    assert inputs.tolist() == [[1, 7, 8, EOS, PAD]]
    assert targets.tolist() == [[7, 8, EOS, IGNORE, IGNORE]]


@pytest.mark.parametrize("impl", ["eager", "auto"])
def test_caption_loss_equals_cross_entropy_on_logits(impl):
    torch.manual_seed(0)
    model = OpenVision2(VIT, DEC).eval()
    tokens = get_tokenizer()(["a red circle", "two small blue squares at the top left"], 16) % 500
    tokens[tokens == 0] = PAD
    out = model(torch.randn(2, 3, 32, 32), tokens)
    loss = CaptionLoss(2.0, impl=impl)(out)["caption_loss"]
    logits = model.decoder.logits(out["caption_hidden"])
    expected = 2.0 * F.cross_entropy(logits.flatten(0, 1), out["caption_targets"].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_stops_at_eos():
    torch.manual_seed(0)
    model = OpenVision2(VIT, DEC).eval()
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.weight[EOS] = 1.0  # a head that always prefers eos when hidden sums are positive
    out = model.generate(torch.randn(3, 3, 32, 32), max_len=10)
    assert out.shape[0] == 3 and out.shape[1] <= 10 and (out[:, 0] == 1).all()
