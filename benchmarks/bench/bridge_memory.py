"""Peak memory per rank of LLaVA-1.5 stage 2 at 7B under FSDP2, counted on the meta device (no weights allocated).

    ov2 bench memory                        # 8 (and 1, 4) x 80 GB, batch 16 x 2048: benchmarks/results/bridge_memory_7b
    ov2 bench memory --world 8 --batch 8 --seq 1024 --out /tmp/mem     # another setting; seconds on a CPU either way

Model: LlavaForConditionalGeneration with Vicuna-7B's shape (Llama-2-7B: D 4096, 32 layers, 32 heads, MLP 11008,
V 32000), CLIP ViT-L/14-336 frozen (576 image tokens from layer -2, CLS dropped) and LLaVA-1.5's 2-layer GELU
projector (with biases). Stage 2 trains projector + LLM with AdamW; the tower is frozen (requires_grad off, as the
bridge does, so autograd saves nothing for it).

The state is what the code holds: stage 2's own set-up (`bridge.train.trainable_names`, then `bridge.engine.wrap`,
then `bridge.train._optimizer`, in train_stage's order) runs on the meta model under a fake process group of W ranks
(torch's testing FakeStore; no collective runs), and every meta storage still alive after it is counted once (gc), so
a reference that keeps a whole parameter alive past the sharding is counted as well as FSDP2's padded shards. On W > 1
that is FSDP2 `fully_shard` on every decoder layer and on the root (everything else, tower included),
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32); on one process the code does not shard:
  parameters        counted: the live storages after set-up (float32; buffers such as rotary tables included)
  gradients         float32, the trainable parameters' counted shards (whole on one process)
  optimizer states  AdamW exp_avg + exp_avg_sq: twice that
  gathered          W > 1: bf16 unsharded root unit (FSDP2 keeps the root gathered through the step) + 2 decoder layers
                    (one computing, one prefetched); one process: autocast's bf16 copy of every trainable weight
                    (cached through the forward, saved for the backward)
  reduce-scatter    W > 1: the largest unit's unsharded gradient, bf16 plus its float32 copy for the reduction
Activations are per rank (B x T tokens, not sharded) and measured: the forward (LlavaModel, then the loss head) runs
on the meta device in bf16 under `torch.autograd.graph.saved_tensors_hooks`, and every storage saved for backward
is counted once. Storages are told apart by identity (`untyped_storage()._cdata`, the meta analogue of a data
pointer), so a tensor saved by three matmuls, or a view of one, counts once; storages of parameters are not
activations. The loss head is the bridge's AnswerLoss (Triton linear cross-entropy, never T x V logits); it cannot
run on meta, so its saves are added by formula with every position an answer token (an upper bound):
hidden [B(T-1), D] bf16 + targets int64 + logsumexp float32 + the bool answer mask.

Attention, causal, no padding mask (the measured batch has none), two ways:
  flash      torch's CPU flash-attention op, whose meta kernel saves what a GPU's sdpa flash backend (bf16) or
             FlashAttention-2 saves: q, k, v, out and the float32 logsumexp (on a CPU transformers' own sdpa saves
             the same; the test checks it). The bold rows.
  sdpa_meta  F.scaled_dot_product_attention as it runs on the meta device: the math path, in float32 (q, k, v
             upcast from bf16) and saving the B x heads x T x T softmax; a worst case a GPU meets only if sdpa falls
             back to math.
Checkpointing (transformers' activation checkpointing on the language model, every layer): what stays is each
layer's input plus everything outside the layers; while the backward recomputes one layer, that layer's own saves
(the largest layer's, measured without checkpointing) are added. It is measured with use_reentrant=True, which saves
the layer inputs through autograd where the hook sees them; the non-reentrant default holds the same tensors.

An estimate of tensors: allocator fragmentation, the CUDA context (~1 GB), NCCL buffers, gradient buffers flowing
through the backward (a few B x T x D) and cuBLAS workspaces are not measured; one fixed allowance row stands for
them. Units: GiB (2^30 bytes). Writes NAME.md and NAME.json (never over existing ones without --force).
"""

from __future__ import annotations

import contextlib
import os
import sys

from benchmarks.bench.results import check_writable, markdown_table, out_options, write_results
from ov2.cli import doc_parser, fail, positive

GIB = 2 ** 30
# The language model's attention for the two kinds of rows: causal, no padding mask, as transformers' sdpa
# integration calls it for an unpadded batch (registered by `register_attention`; a name containing "flash" would
# mean FlashAttention-2 to transformers).
ATTENTION = {"flash": "ov2_fused_causal", "sdpa_meta": "ov2_sdpa_causal"}
# Vicuna-7B v1.5 = Llama-2-7B; CLIP ViT-L/14 at 336 px (24 x 24 = 576 patches).
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def llava_config(text: dict = LLAMA_7B, vision: dict = CLIP_L14_336, image_token_id: int | None = None):
    """LLaVA-1.5's LlavaConfig for the given Llama and CLIP shapes. The image token id defaults to one past the text
    vocabulary (LLaVA-1.5 adds no word for it; only its placement matters on the meta device)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                       image_token_id=text["vocab_size"] if image_token_id is None else image_token_id,
                       projector_hidden_act="gelu", multimodal_projector_bias=True, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def build(cfg, device: str = "meta", dtype=None, attn: str = "sdpa"):
    """The LLaVA model on `device` in training mode with the tower frozen; `attn` is the language model's attention."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if attn in ATTENTION.values():
        register_attention()
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = "sdpa" if attn in ATTENTION.values() else attn
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    if dtype is not None:
        model.to(dtype)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    return model


def register_attention() -> None:
    """Register ATTENTION's two implementations (no padding mask; the measured batch has none):
    "flash": torch's CPU flash-attention op, which saves what FlashAttention-2 saves (q, k, v, out, float32
             logsumexp) on the CPU and on the meta device alike;
    "sdpa_meta": F.scaled_dot_product_attention(is_causal=True), which on the meta device takes the math path and
             also saves the B x heads x T x T softmax (on a CPU or GPU it picks a fused kernel instead)."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface

    def fused(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout,
                                                                            is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTENTION["flash"], fused)
    AttentionInterface.register(ATTENTION["sdpa_meta"], sdpa)


def param_counts(model) -> dict:
    """Parameter counts: trainable (projector + LLM), frozen (tower), per decoder layer and of the FSDP2 root unit."""
    lm = model.model.language_model
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    layers = [numel(layer.parameters()) for layer in lm.layers]
    total = numel(model.parameters())
    return {"total": total, "trainable": numel(p for p in model.parameters() if p.requires_grad),
            "frozen": numel(p for p in model.parameters() if not p.requires_grad),
            "projector": numel(model.model.multi_modal_projector.parameters()), "layer": max(layers),
            "root": total - sum(layers),
            "root_trainable": numel(p for p in model.parameters() if p.requires_grad) - sum(layers)}


@contextlib.contextmanager
def fake_group(world: int):
    """A process group of `world` ranks in which this process is rank 0 and no collective communicates."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("ov2 bench memory counts under a fake process group: run it outside torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def live_meta_bytes() -> int:
    """Bytes of every meta storage alive in this process, each counted once (a DTensor by its local shard)."""
    import gc

    import torch

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and type(obj).__name__ != "DTensor" and obj.device.type == "meta":
            storage = obj.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def held_by_stage2(cfg, world: int) -> dict:
    """What one rank holds after stage 2's set-up as bridge.train runs it (module docstring): {"parameters": live
    bytes, "trainable": bytes of the trainable parameters' local shards, "sharded": whether FSDP2 wrapped it}."""
    import torch

    from bridge import engine
    from bridge.config import LlavaStageConfig
    from bridge.train import _optimizer, trainable_names

    before = live_meta_bytes()
    stage = LlavaStageConfig(stage=2, steps=1, batch_size=world, fsdp=True)
    with fake_group(world):
        model = build(cfg)
        groups = trainable_names(model, stage)
        root = engine.wrap(model, world > 1, True, torch.device("cpu"))
        optimizer = _optimizer(model, groups, stage)
        local = lambda p: p.to_local() if type(p).__name__ == "DTensor" else p  # noqa: E731
        trainable = sum(local(p).untyped_storage().nbytes() for g in optimizer.param_groups for p in g["params"])
        held = {"parameters": live_meta_bytes() - before, "trainable": trainable, "sharded": engine.is_sharded(model)}
        del model, root, optimizer
    return held


def state_bytes(counts: dict, held: dict) -> dict:
    """Per-rank bytes of the training state (see the module docstring)."""
    sharded = held["sharded"]
    return {"parameters": held["parameters"], "gradients": held["trainable"], "optimizer": 2 * held["trainable"],
            "gathered": (counts["root"] + 2 * counts["layer"]) * 2 if sharded else counts["trainable"] * 2,
            "reduce_scatter": max(counts["root_trainable"], counts["layer"]) * (2 + 4) if sharded else 0}


def batch_inputs(cfg, batch: int, seq: int, device: str, dtype) -> dict:
    """A stage-2 batch of `seq` tokens, the image's tokens right after the first one, no padding."""
    import torch

    v = cfg.vision_config
    n_image = (v.image_size // v.patch_size) ** 2
    if n_image + 2 > seq:
        raise ValueError(f"--seq {seq} leaves no room for text around {n_image} image tokens")
    ids = torch.ones(batch, seq, dtype=torch.long, device=device)
    ids[:, 1: 1 + n_image] = cfg.image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.zeros(batch, 3, v.image_size, v.image_size, dtype=dtype, device=device)}


def loss_head_bytes(batch: int, seq: int, hidden: int) -> int:
    """AnswerLoss's saves with every position an answer: hidden[keep] bf16, targets int64, logsumexp float32, mask."""
    n = batch * (seq - 1)
    return n * (hidden * 2 + 8 + 4 + 1)


def saved_bytes(model, inputs: dict) -> dict:
    """Bytes saved for backward by `model.model(**inputs)`, by part: "tower", "projector", "layer i", "rest"."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple] = {}  # storage id -> (part, bytes, the tensor, kept alive so the id is not reused)
    current = ["rest"]
    parts = {"tower": model.model.vision_tower, "projector": model.model.multi_modal_projector}
    parts.update({f"layer {i}": layer for i, layer in enumerate(model.model.language_model.layers)})
    hooks = []
    for name, module in parts.items():
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: current.__setitem__(0, name)))
        hooks.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, "rest")))

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in seen:
            seen[storage._cdata] = (current[0], storage.nbytes(), t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), no_meta_checks(model):
            out = model.model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    by_part = {name: 0 for name in ["tower", "projector", *[n for n in parts if n.startswith("layer")], "rest"]}
    for part, nbytes, _ in seen.values():
        by_part[part] += nbytes
    del out
    return by_part


@contextlib.contextmanager
def no_meta_checks(model):
    """transformers checks the image-token count with a host sync, impossible on meta; skip it there only."""
    meta = next(model.parameters()).device.type == "meta"
    before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    if meta:
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if meta and before is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK")
        elif meta:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = before


def activations(cfg, batch: int, seq: int, attn: str, checkpointing: bool, device: str = "meta", dtype=None) -> dict:
    """{"saved", "layers", "largest_layer", "tower", "projector", "rest"} bytes saved for backward by the trunk."""
    import torch

    dtype = dtype or torch.bfloat16
    model = build(cfg, device, dtype, attn)
    if checkpointing:
        model.model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True})
    by_part = saved_bytes(model, batch_inputs(cfg, batch, seq, device, dtype))
    layers = [v for k, v in by_part.items() if k.startswith("layer")]
    return {"saved": sum(by_part.values()), "layers": sum(layers), "largest_layer": max(layers),
            "tower": by_part["tower"], "projector": by_part["projector"], "rest": by_part["rest"]}


def estimate(batch: int, seq: int, worlds: list[int], gpu_gib: float, allowance_gib: float) -> dict:
    """The per-rank table for each world size, plus the measured pieces behind it."""
    counts = param_counts(build(llava_config()))
    head = loss_head_bytes(batch, seq, LLAMA_7B["hidden_size"])
    plain = {name: activations(llava_config(), batch, seq, attn, False) for name, attn in ATTENTION.items()}
    ckpt = activations(llava_config(), batch, seq, ATTENTION["flash"], True)
    acts = {}
    for name in ATTENTION:
        acts[f"no_checkpointing_{name}"] = plain[name]["saved"] + head
        acts[f"checkpointing_{name}"] = ckpt["saved"] + plain[name]["largest_layer"] + head
    rows, held = [], {}
    for world in worlds:
        held[world] = held_by_stage2(llava_config(), world)
        row = {"world": world, **{k: v / GIB for k, v in state_bytes(counts, held[world]).items()},
               **{k: v / GIB for k, v in acts.items()}, "allowance": allowance_gib}
        fixed = sum(row[k] for k in ("parameters", "gradients", "optimizer", "gathered", "reduce_scatter",
                                     "allowance"))
        for key in acts:
            row[f"total_{key}"] = fixed + row[key]
        row["fits_checkpointing"] = row["total_checkpointing_flash"] <= gpu_gib
        row["fits_no_checkpointing"] = row["total_no_checkpointing_flash"] <= gpu_gib
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return {"rows": rows, "counts": counts, "loss_head": head, "plain": plain, "checkpointing": ckpt, "held": held}


LABELS = [("parameters", "parameters held after stage 2's set-up (float32 shards, tower included; counted)"),
          ("gradients", "gradients (float32 shards)"), ("optimizer", "optimizer states (AdamW, float32 shards)"),
          ("gathered", "gathered layers (bf16: root unit + 2 decoder layers; 1 process: autocast's weight copies)"),
          ("reduce_scatter", "unsharded gradient before reduce-scatter (largest unit, bf16 + float32)"),
          ("no_checkpointing_flash", "activations, no checkpointing (flash)"),
          ("no_checkpointing_sdpa_meta", "activations, no checkpointing (sdpa as on meta: saves T x T)"),
          ("checkpointing_flash", "activations, checkpointing (flash)"),
          ("checkpointing_sdpa_meta", "activations, checkpointing (sdpa as on meta)"),
          ("allowance", "allowance: CUDA context, NCCL buffers, fragmentation (fixed)"),
          ("total_no_checkpointing_flash", "**total, no checkpointing (flash)**"),
          ("total_checkpointing_flash", "**total, checkpointing (flash)**"),
          ("total_no_checkpointing_sdpa_meta", "total, no checkpointing (sdpa as on meta)"),
          ("total_checkpointing_sdpa_meta", "total, checkpointing (sdpa as on meta)")]


def report(result: dict, a, command: str) -> str:
    rows, c = result["rows"], result["counts"]
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    table = markdown_table(["per rank, GiB", *[f"{r['world']} x {a.gpu_gib:g} GiB" for r in rows]],
                           [[label, *[f"{r[key]:.2f}" for r in rows]] for key, label in LABELS])
    eight = next((r for r in rows if r["world"] == 8), rows[-1])
    verdict = (f"fits on {eight['world']}x{a.gpu_gib:g} GB with checkpointing "
               f"({eight['total_checkpointing_flash']:.1f} GiB per rank)" if eight["fits_checkpointing"] else
               f"does not fit on {eight['world']}x{a.gpu_gib:g} GB even with checkpointing "
               f"({eight['total_checkpointing_flash']:.1f} GiB per rank)")
    if eight["fits_checkpointing"] and not eight["fits_no_checkpointing"]:
        verdict += "; not without it"
    f, m, k = result["plain"]["flash"], result["plain"]["sdpa_meta"], result["checkpointing"]
    held = "; ".join(f"{w} rank(s): {gib(h['parameters'])} GiB, {h['parameters'] / (c['total'] * 4):.3f} of the "
                     f"float32 model" for w, h in result["held"].items())
    return (f"# LLaVA-1.5 stage 2 (7B) memory per rank under FSDP2, counted on the meta device\n\n`{command}`: "
            f"Vicuna-7B-shaped LLM + CLIP ViT-L/14-336 (frozen) + 2-layer GELU projector; per-GPU batch {a.batch} "
            f"x {a.seq} tokens (576 image tokens inside), bf16 compute, AdamW; FSDP2 full sharding with float32 "
            f"master weights, gradients and optimizer states (one process: not sharded, as the code runs it)."
            f"\n\n{table}\n**Verdict: {verdict}.**\n\n"
            f"Parameters: {c['total']:,} ({c['trainable']:,} trainable: LLM + projector {c['projector']:,}; "
            f"{c['frozen']:,} frozen tower); {c['layer']:,} per decoder layer; root unit {c['root']:,}. The parameter "
            f"row is counted from what stays alive after stage 2's own set-up (names, engine.wrap, optimizer) under a "
            f"fake process group: {held}. Before stage 2 shards it, every rank holds the whole model in float32 "
            f"on its GPU ({gib(c['total'] * 4)} GiB: bridge.pipeline.run moves it there for stage 1, whose "
            f"activations come on top) and, while loading, on the host.\n\n"
            f"Activations measured (GiB; saved-for-backward storages, each once): no checkpointing, flash: decoder "
            f"layers {gib(f['layers'])} (largest {gib(f['largest_layer'])}), projector {gib(f['projector'])}, tower "
            f"{gib(f['tower'])}, rest (final norm, token ids, rotary tables) {gib(f['rest'])}; sdpa as on meta: layers "
            f"{gib(m['layers'])} (largest {gib(m['largest_layer'])}). "
            f"Checkpointing keeps {gib(k['saved'])} (layer inputs {gib(k['layers'])}) plus one layer recomputed. "
            f"Loss head (AnswerLoss, by formula, every position an answer): {gib(result['loss_head'])}.\n\n"
            "Attention: the bold rows assume flash attention (a GPU's sdpa flash backend in bf16 without a "
            "padding mask, or FlashAttention-2: q, k, v, out and logsumexp saved); the sdpa rows are sdpa as it runs "
            "on the meta device (the math path in float32, which also saves the B x heads x T x T softmax), a worst "
            "case a GPU meets only if sdpa falls back to math.\n\n"
            "Caveats: an estimate of tensors, not a measurement on a GPU. The allowance row stands for the CUDA "
            "context (~1 GB), NCCL buffers, allocator fragmentation, cuBLAS workspaces and the few B x T x D "
            "gradients in flight during the backward. The HF default loss (`labels=`) would add float32 B x T x V "
            "log-probabilities (4 GiB saved at 16 x 2048, ~8 GiB more in its backward); the bridge's AnswerLoss "
            "never holds them.\n")


def worlds_type(text: str) -> list[int]:
    parse = positive(int)
    return [parse(part) for part in text.split(",")]


worlds_type.__name__ = "world sizes"


def main(argv: list[str] | None = None) -> int:
    prog = "ov2 bench memory"
    parser = doc_parser(prog, __doc__)
    parser.add_argument("--world", type=worlds_type, default=[1, 4, 8], help="ranks, comma-separated (default 1,4,8)")
    parser.add_argument("--batch", type=positive(int), default=16, help="sequences per GPU (default 16)")
    parser.add_argument("--seq", type=positive(int), default=2048, help="tokens per sequence, image included "
                        "(default 2048, LLaVA-1.5's model_max_length)")
    parser.add_argument("--gpu-gib", type=positive(float), default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--allowance-gib", type=positive(float, zero=True), default=4.0,
                        help="fixed allowance for what is not counted (default 4)")
    out_options(parser, "bridge_memory_7b")
    a = parser.parse_args(argv)
    n_image = (CLIP_L14_336["image_size"] // CLIP_L14_336["patch_size"]) ** 2
    if a.seq < n_image + 2:
        return fail(prog, f"--seq {a.seq} leaves no room for text around {n_image} image tokens (at least "
                          f"{n_image + 2})")
    out_dir, name = os.path.split(os.path.abspath(a.out))
    try:
        check_writable(out_dir, name, a.force, ("md", "json"))
    except ValueError as err:
        return fail(prog, err)
    result = estimate(a.batch, a.seq, a.world, a.gpu_gib, a.allowance_gib)
    command = "ov2 bench memory " + " ".join(argv if argv is not None else sys.argv[1:])
    md = report(result, a, command.strip())
    meta = {"command": command.strip(), "batch": a.batch, "seq": a.seq, "gpu_gib": a.gpu_gib, "units": "GiB",
            "params": result["counts"], "activation_bytes": {"no_checkpointing": result["plain"],
                                                              "checkpointing": result["checkpointing"],
                                                              "loss_head": result["loss_head"]},
            "held_after_setup_bytes": {str(w): h for w, h in result["held"].items()}}
    write_results(out_dir, name, result["rows"], md, a.force, formats=("md", "json"), meta=meta)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
