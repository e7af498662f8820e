"""One training-cost measurement in a fresh process: build a preset's model, run warm-up and timed steps, report.

    python -m benchmarks.bench.train_worker '{"preset": "ov2-b16", "image_size": 224, "batch": 4, "steps": 3}'

Prints one JSON line: {"step_s": [...], "peak_mib": ..., "base_mib": ..., "device": ...}. A step is a full
training step as the trainer takes it: forward, the family's losses, backward, AdamW step. The batch is random
pixels and full-length texts (every caption 128 tokens, every alt-text / sentence the text context), the
worst case the recipe allows. Peak memory: the CUDA allocator's peak on a GPU; on the CPU the process's peak
resident set (`base_mib` is the resident set after imports, before the model exists). On CUDA the steps run
under bf16 autocast; out of memory exits with code 3.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ov2.runfolder import peak_rss_mb


def synthetic_batch(cfg, batch: int, image_size: int, device: torch.device) -> dict:
    """Random pixels; captions of max_len tokens (bos ... eos, no pad); long strings truncated to the text context."""
    from encoder.tokenizer import BOS, EOS, get_tokenizer

    g = torch.Generator().manual_seed(0)
    T = cfg.model.decoder.max_len
    tokens = torch.randint(3, min(cfg.model.decoder.vocab_size, 30_522), (batch, T), generator=g)
    tokens[:, 0], tokens[:, -1] = BOS, EOS
    text = " ".join(["photo"] * (2 * cfg.model.text.context))  # one WordPiece token per word, cut to the context
    return {"pixels": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
            "tokens": tokens.to(device), **dict.fromkeys(  # the collate's text tokens (CLIP: text; OV1: alt, sentence)
                ("text_tokens", "alt_tokens", "sentence_tokens"),
                get_tokenizer()([text] * batch, cfg.model.text.context).to(device))}


def measure(spec: dict) -> dict:
    from encoder.config import apply_overrides, get_preset
    from encoder.models import build_losses, build_model
    from encoder.train import TrainModule, make_optimizer

    base = peak_rss_mb()
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    cfg = apply_overrides(get_preset(spec["preset"]), spec.get("overrides", []))
    cfg.model.vit.image_size = spec["image_size"]
    torch.manual_seed(0)
    module = TrainModule(build_model(cfg.model), build_losses(cfg)).to(device).train()
    optimizer = make_optimizer(module, cfg, 1e-4)
    batch = synthetic_batch(cfg, spec["batch"], spec["image_size"], device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(spec.get("warmup", 1) + spec["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = module(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= spec.get("warmup", 1):
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"step_s": times, "peak_mib": round(peak, 1), "base_mib": round(base if device.type == "cpu" else 0.0, 1),
            "loss": float(loss.detach()), "device": device.type,
            "params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 2)}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    try:
        result = measure(spec)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"oom": True}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
