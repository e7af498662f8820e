"""OpenVision 2 model: prefix-LM mask, random token keep, caption loss = F.cross_entropy, generation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from encoder.config import get_preset
from encoder.losses import CaptionLoss
from encoder.models.decoder import PrefixDecoder
from encoder.models.ov2 import IGNORE, OpenVision2, keep_random_tokens, shift_targets
from encoder.tokenizer import BOS, EOS, PAD, get_tokenizer
from tests.helpers import assert_close_scaled

MICRO = get_preset("ov2-micro").model  # ViT 64 x 2 at 32 px, patch 8 (16 patches); decoder 64 x 1
VIT, DEC = MICRO.vit, MICRO.decoder
D = DEC.width


def _decoder(mask="prefix"):
    torch.manual_seed(0)
    return PrefixDecoder(dataclasses.replace(DEC, mask=mask)).eval()


def _model(**kwargs) -> OpenVision2:
    torch.manual_seed(0)
    return OpenVision2(dataclasses.replace(MICRO, **kwargs))


def test_prefix_lm_text_is_causal_and_image_ignores_text():
    dec = _decoder()
    prefix = torch.randn(2, 5, D)
    text = torch.randn(2, 7, D)
    changed = text.clone()
    changed[:, 4] += torch.randn(D)  # change a later text token
    a = dec(prefix, text, return_prefix=True)
    b = dec(prefix, changed, return_prefix=True)
    assert torch.equal(a[:, : 5 + 4], b[:, : 5 + 4])  # image tokens and earlier text positions unchanged
    assert not torch.allclose(a[:, 5 + 4:], b[:, 5 + 4:])  # the changed position and later ones do change
    # image-token outputs do not depend on any text at all
    c = dec(prefix, torch.randn(2, 3, D), return_prefix=True)
    assert_close_scaled(a[:, :5], c[:, :5], rel=1e-6, msg="image tokens with other text")


def test_image_tokens_see_each_other_under_prefix_lm_but_not_under_causal():
    prefix = torch.randn(1, 5, D)
    changed = prefix.clone()
    changed[:, 4] += torch.randn(D)  # change the last image token
    text = torch.randn(1, 3, D)
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
    model = _model(keep_ratio=0.25)
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
    model = _model().eval()
    tokens = get_tokenizer()(["a red circle", "two small blue squares at the top left"], DEC.max_len)
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert (out["caption_targets"] == IGNORE).any()  # the shorter caption's pads are ignored
    loss = CaptionLoss(2.0, impl=impl)(out)["caption_loss"]
    logits = model.decoder.logits(out["caption_hidden"])
    expected = 2.0 * F.cross_entropy(logits.flatten(0, 1), out["caption_targets"].flatten(), ignore_index=IGNORE)
    assert_close_scaled(loss, expected, rel=1e-5, msg=impl)


def test_greedy_generation_stops_at_eos_and_pads_after_it():
    """A head whose argmax is eos when the hidden state points along v and word 7 otherwise: each row writes 7s
    until its own hidden state turns, so rows stop at different steps."""
    model = _model().eval()
    v = torch.randn(D)
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.weight[EOS] = v
        model.decoder.head.weight[7] = -v
    pixels = torch.randn(8, 3, 32, 32)
    max_len = 12
    out = model.generate(pixels, max_len=max_len)
    assert out.shape[0] == 8 and out.shape[1] <= max_len and (out[:, 0] == BOS).all()
    ends = []
    for row, image in zip(out.tolist(), pixels):
        assert set(row[1:]) <= {7, EOS, PAD}, row
        end = row.index(EOS) if EOS in row else len(row)
        assert all(t == 7 for t in row[1:end]) and all(t == PAD for t in row[end + 1:]), row  # pad after eos only
        ends.append(end)
        alone = model.generate(image[None], max_len=max_len)[0].tolist()  # each row as if generated alone
        assert alone == row[: len(alone)] and all(t == PAD for t in row[len(alone):]), (alone, row)
    assert len(set(ends)) > 1 and out.shape[1] == max_len, ends  # some rows ended early, some ran to max_len
    finished = [i for i, row in enumerate(out.tolist()) if EOS in row]
    early = model.generate(pixels[finished], max_len=max_len)  # only rows that end: generation stops with them
    assert early.shape[1] == max(ends[i] for i in finished) + 1 < max_len, early


def test_a_position_table_of_another_grid_is_built_once(monkeypatch):
    """A stage at another resolution than the ViT's own builds its position table once per (grid, device, dtype),
    not on every forward (on a GPU each rebuild was a blocking host-to-device copy); the numbers are the table's."""
    from encoder.models import vit

    built = []
    original = vit.position_table
    monkeypatch.setattr(vit, "position_table", lambda *a: built.append(a) or original(*a))
    model = vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64))
    built.clear()  # the model's own 4 x 4 grid: its buffer
    pixels = torch.randn(2, 3, 16, 16)
    first, second = model(pixels)["tokens"], model(pixels)["tokens"]
    assert built == [(2, 2, 32)]  # 16 px / patch 8: one table, for the 2 x 2 grid
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    x = model.patch_embed(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1)
    torch.testing.assert_close(model.embed(pixels), x + original(2, 2, 32))
