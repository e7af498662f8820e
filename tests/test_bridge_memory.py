"""`ov2 bench memory`: what the meta device counts is what a real forward holds. A tiny LLaVA (Llama text model,
CLIP tower) built from configs, counted on meta and on the CPU with the same inputs."""

import torch

from benchmarks.bench import bridge_memory as mem
from tests.helpers import run_inprocess

# D 64, 3 layers, 4 heads; a 32 px tower with 8 px patches: 16 image tokens inside T = 40.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=100)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8)
B, T = 2, 40


def tiny():
    return mem.llava_config(TEXT, VISION, image_token_id=99)


def test_meta_parameter_count_is_the_real_models():
    meta = mem.param_counts(mem.build(tiny(), "meta"))
    real = mem.build(tiny(), "cpu")
    assert meta["total"] == sum(p.numel() for p in real.parameters())
    assert meta["frozen"] == sum(p.numel() for p in real.model.vision_tower.parameters())
    assert meta["trainable"] == sum(p.numel() for p in real.model.language_model.parameters()) + sum(
        p.numel() for p in real.model.multi_modal_projector.parameters()) + real.lm_head.weight.numel()
    assert meta["root"] + TEXT["num_hidden_layers"] * meta["layer"] == meta["total"]


def test_saved_bytes_on_meta_equal_a_real_cpu_forward():
    """Storage by storage, in bf16, with and without checkpointing; the "flash" attention also equals transformers'
    own sdpa on the CPU (its fused kernel saves q, k, v, out, logsumexp). The frozen tower saves nothing."""
    for attn in ("eager", mem.ATTENTION["flash"]):
        for checkpointing in (False, True):
            meta = mem.activations(tiny(), B, T, attn, checkpointing, "meta")
            cpu = mem.activations(tiny(), B, T, attn, checkpointing, "cpu")
            assert meta == cpu, (attn, checkpointing)
            assert meta["tower"] == 0 and meta["projector"] > 0
    flash = mem.activations(tiny(), B, T, mem.ATTENTION["flash"], False, "meta")
    assert flash == mem.activations(tiny(), B, T, "sdpa", False, "cpu")


def test_storage_identity_on_meta_counts_what_data_pointers_count_on_cpu():
    """An independent count on the CPU: distinct data pointers of saved tensors, parameters' excluded."""
    model = mem.build(tiny(), "cpu", torch.bfloat16, "eager")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.model(**mem.batch_inputs(tiny(), B, T, "cpu", torch.bfloat16), use_cache=False)
    assert out.last_hidden_state.requires_grad
    assert sum(storages.values()) == mem.activations(tiny(), B, T, "eager", False, "meta")["saved"]


def test_checkpointing_keeps_only_layer_inputs():
    plain = mem.activations(tiny(), B, T, mem.ATTENTION["flash"], False)
    ckpt = mem.activations(tiny(), B, T, mem.ATTENTION["flash"], True)
    assert ckpt["saved"] < plain["saved"]
    assert ckpt["layers"] == TEXT["num_hidden_layers"] * B * T * TEXT["hidden_size"] * 2  # one bf16 input a layer
    assert ckpt["rest"] == plain["rest"] and ckpt["projector"] == plain["projector"]
    # sdpa on meta (math path, float32) also holds each layer's heads x T x T softmax
    math = mem.activations(tiny(), B, T, mem.ATTENTION["sdpa_meta"], False)
    assert math["largest_layer"] - plain["largest_layer"] >= B * TEXT["num_attention_heads"] * T * T * 4


def test_the_meta_forward_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK", raising=False)
    mem.activations(tiny(), B, T, "eager", False, "meta", torch.float32)
    import os

    assert "TRANSFORMERS_DISABLE_TORCH_CHECK" not in os.environ


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args in (["--world", "0"], ["--world", "8,x"], ["--seq", "100"], ["--batch", "-1"]):
        result = run_inprocess("bench", "memory", *args, "--out", str(tmp_path / "m"))
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr, (args, result.stderr)
    assert not list(tmp_path.iterdir())
    help_text = run_inprocess("bench", "memory", "--help").stdout
    assert "meta device" in help_text and "ov2 bench memory" in help_text


def test_the_state_row_counts_what_stage_2s_own_set_up_holds(monkeypatch):
    """bridge.train's names -> engine.wrap -> optimizer under a fake group of 2 ranks: each rank holds about half the
    float32 model (FSDP2's padding aside); on one process, the whole. A reference that keeps the unsharded
    parameters alive past the sharding (what stage 2 did before it kept only names) is counted too."""
    from bridge import train

    whole = mem.param_counts(mem.build(tiny()))["total"] * 4
    buffers = sum(b.untyped_storage().nbytes() for b in mem.build(tiny()).buffers())  # rotary tables, position ids
    one, two = mem.held_by_stage2(tiny(), 1), mem.held_by_stage2(tiny(), 2)
    assert not one["sharded"] and one["parameters"] == whole + buffers
    assert two["sharded"] and 0.5 <= two["parameters"] / whole < 0.52, two["parameters"] / whole
    trainable = mem.param_counts(mem.build(tiny()))["trainable"] * 4
    assert 0.5 <= two["trainable"] / trainable < 0.52
    held = []
    names = train.trainable_names

    def keeping(model, cfg):  # the old stage kept the parameters it trains in a local until it returned
        held.append(list(model.parameters()))
        return names(model, cfg)

    monkeypatch.setattr(train, "trainable_names", keeping)
    assert mem.held_by_stage2(tiny(), 2)["parameters"] >= 1.5 * whole
