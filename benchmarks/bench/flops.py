"""Forward FLOPs per image of OpenVision 2, OpenVision (v1) and CLIP at every paper preset and resolution.

    ov2 bench flops                   # table: GFLOPs per part, the paper's value and the difference
    ov2 bench flops --json            # a list of records {family, preset, image_size, text_passes, gflops, ...}
    ov2 bench flops --presets l14,so400m14 --save      # also write benchmarks/results/cost_flops.{csv,md}

Counted with `torch.utils.flop_counter` (a multiply-add = 2 FLOPs; matmuls and convolutions only, layer norms
and activations are not counted) on one image, with the model built on the meta device: no weights are
allocated, and attention decomposes into two batched matmuls there (scores and values), so it is in the count.
(On the CPU the fused `scaled_dot_product_attention` kernel counts as zero.) Every part is the preset's own
module run on the shapes of a training step:

  OV2   ViT on every patch -> keep floor(N x keep_ratio) patch tokens -> projector -> decoder blocks over
        [kept tokens; 127 caption positions] -> head (32,000 rows) on the 127 caption positions.
  OV1   ViT -> text encoder on 80 tokens, once per text pass -> projector (patches and alt-text tokens) ->
        decoder blocks over [patches; 80 alt-text tokens; 128 queries] -> caption head on the queries, plus the
        contrastive heads. As trained, the text encoder runs twice (alt-text and a caption sentence,
        text_passes = 2); the paper's figures count one pass (text_passes = 1).
  CLIP  ViT -> one 80-token text pass -> contrastive heads. The paper gives no CLIP figure.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench.results import RESULTS, OutputExists, check_writable, markdown_table, write_results
from encoder.config import FAMILIES
from ov2.cli import ArgumentParser, fail

PRESETS = ("b16", "l14", "so400m14", "h14", "g14")
# The paper's forward GFLOPs per image (OpenVision 2, arXiv 2509.01644); SoViT-400M "@384" is our 378 px
# (the same 27 x 27 grid of 14 px patches).
PAPER = {("ov2", "l14", 224): 208.90, ("ov1", "l14", 224): 271.75,
         ("ov2", "so400m14", 378): 1017.74, ("ov1", "so400m14", 378): 1636.75}
PARTS = ("vit", "projector", "decoder", "head", "text")
TEXT_TOKENS = 80  # OpenVision (v1) text context (alt-text and caption sentence)


def _counted(fn) -> tuple[object, float, float]:
    """Run fn() under a FLOP counter: (its result, all FLOPs, attention FLOPs = the batched matmuls)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    ops = counter.get_flop_counts().get("Global", {})
    attention = sum(n for op, n in ops.items() if "bmm" in str(op) or "attention" in str(op))
    return result, float(counter.get_total_flops()), float(attention)


def build_meta_model(family: str, preset: str, image_size: int | None = None):
    """The preset's model on the meta device (no memory), in training mode; returns (model, config)."""
    from encoder.config import get_preset
    from encoder.models import build_model
    from encoder.models import vit as vit_module

    cfg = get_preset(f"{family}-{preset}")
    cfg.model.vit.image_size = image_size or max(s.image_size for s in cfg.stages)
    vit_module.sincos_2d.cache_clear()  # the position table is cached: keep meta tensors out of that cache
    try:
        with torch.device("meta"):
            model = build_model(cfg.model)
    finally:
        vit_module.sincos_2d.cache_clear()
    return model.train(), cfg


def count_model(model, cfg, family: str, image_size: int, text_passes: int = 1) -> dict:
    """FLOPs of one training-shaped forward of one image, split by part: {part: flops, "attention": flops, ...}."""
    meta = torch.device("meta")
    pixels = torch.empty(1, 3, image_size, image_size, device=meta)
    parts = dict.fromkeys(PARTS, 0.0)
    attention = 0.0

    def add(part: str, fn):
        nonlocal attention
        result, flops, attn = _counted(fn)
        parts[part] += flops
        attention += attn
        return result

    tokens = add("vit", lambda: model.vit(pixels)["tokens"])
    patches = tokens[:, 1:]
    decoder_tokens = None
    if family == "ov2":
        # image_prefix runs the ViT again (counted apart above): its count minus the ViT's is the projector
        _, vit_only, vit_attn = _counted(lambda: model.vit(pixels))
        prefix = add("projector", lambda: model.image_prefix(pixels))
        parts["projector"] -= vit_only
        attention -= vit_attn
        text_len = cfg.model.decoder.max_len - 1  # inputs = caption tokens[:, :-1]
        text = torch.empty(1, text_len, cfg.model.decoder.width, device=meta)
        hidden = add("decoder", lambda: model.decoder(prefix, text))
        add("head", lambda: model.decoder.logits(hidden))
        decoder_tokens = prefix.shape[1]
    else:
        ids = torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=meta)
        alt = None
        for _ in range(text_passes):
            alt = add("text", lambda: model.text(ids))
        add("head", lambda: model.image_head(model.vit.pooled(tokens)))
        for _ in range(text_passes):
            add("head", lambda: model.text.head(alt["pooled"]))
        if family == "ov1":
            _, proj, _ = _counted(lambda: (model.image_proj(patches), model.text_proj(alt["tokens"])))
            hidden = add("decoder", lambda: model.caption_hidden(patches, alt))
            parts["decoder"] -= proj
            parts["projector"] += proj
            add("head", lambda: model.decoder.logits(hidden))
            decoder_tokens = patches.shape[1]
    total = sum(parts.values())
    return {"total": total, "attention": attention, "decoder_image_tokens": decoder_tokens, **parts}


def count_all(presets=PRESETS, families=FAMILIES, progress: bool = True) -> list[dict]:
    """One record per family, preset, stage resolution (and, for OV1, text passes 2 = as trained, 1 = paper)."""
    from tqdm import tqdm

    jobs = [(f, p) for p in presets for f in families]
    records = []
    for family, preset in tqdm(jobs, desc="counting", disable=not progress, leave=False):
        model, cfg = build_meta_model(family, preset)
        for size in sorted({s.image_size for s in cfg.stages}):
            for passes in {"ov2": (None,), "ov1": (2, 1), "clip": (1,)}[family]:
                counted = count_model(model, cfg, family, size, passes or 1)
                paper = PAPER.get((family, preset, size))
                gflops = counted["total"] / 1e9
                label = {None: "", 1: "one text pass (as the paper counted)" if family == "ov1" else "",
                         2: "two text passes (as trained)"}[passes]
                records.append({
                    "family": family, "preset": preset, "image_size": size, "text_passes": passes,
                    "counting": label, "gflops": round(gflops, 2), "paper_gflops": paper,
                    "diff": None if paper is None else round(gflops / paper - 1, 4),
                    **{f"{part}_gflops": round(counted[part] / 1e9, 2) for part in PARTS},
                    "attention_gflops": round(counted["attention"] / 1e9, 2),
                    "decoder_image_tokens": counted["decoder_image_tokens"],
                })
    return records


def ratios(records: list[dict]) -> list[dict]:
    """OV1 (one text pass, as the paper counted) / OV2 where the paper gives both."""
    by = {(r["family"], r["preset"], r["image_size"], r["text_passes"]): r for r in records}
    out = []
    for (family, preset, size), _ in PAPER.items():
        ov1, ov2 = by.get(("ov1", preset, size, 1)), by.get(("ov2", preset, size, None))
        if family == "ov2" and ov1 and ov2:
            out.append({"preset": preset, "image_size": size, "ratio": round(ov1["gflops"] / ov2["gflops"], 3),
                        "paper_ratio": round(PAPER[("ov1", preset, size)] / PAPER[("ov2", preset, size)], 3)})
    return out


def render(records: list[dict]) -> str:
    header = ["family", "preset", "px", "text passes", "GFLOPs", "paper", "diff", "ViT", "projector", "decoder",
              "head", "text", "attention", "decoder image tokens"]
    rows = [[r["family"], r["preset"], r["image_size"], r["text_passes"] or "-", f"{r['gflops']:.2f}",
             r["paper_gflops"], "" if r["diff"] is None else f"{100 * r['diff']:+.1f}%",
             *(f"{r[f'{p}_gflops']:.2f}" for p in PARTS), f"{r['attention_gflops']:.2f}",
             r["decoder_image_tokens"] or "-"] for r in records]
    text = ("# Forward GFLOPs per image (multiply-add = 2)\n\n"
            "Counted by `ov2 bench flops` on the meta device (attention included as two matmuls per layer; layer "
            "norms and activations not counted). OV1 with 2 text passes is the model as trained (alt-text and a "
            "caption sentence through the text encoder); 1 pass is how the paper counted it. 'attention' is the "
            "part of the total spent in the attention score and value matmuls. SoViT-400M's 378 px is the paper's "
            "384 px grid (27 x 27 patches).\n\n" + markdown_table(header, rows))
    ratio_rows = [[r["preset"], r["image_size"], f"{r['ratio']:.3f}", f"{r['paper_ratio']:.3f}"]
                  for r in ratios(records)]
    if ratio_rows:
        text += "\nOV1 (one text pass) / OV2:\n\n" + markdown_table(["preset", "px", "counted", "paper"], ratio_rows)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ov2 bench flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the records as one JSON list (for scripts)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list of sizes (default all)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list (default: all of them)")
    parser.add_argument("--save", action="store_true", help="also write cost_flops.csv and cost_flops.md to --out")
    parser.add_argument("--out", default=RESULTS, help="folder for --save (default benchmarks/results)")
    parser.add_argument("--force", action="store_true", help="with --save: overwrite existing result files")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    families = [f for f in args.families.split(",") if f]
    bad = [p for p in presets if p not in PRESETS] + [f for f in families if f not in FAMILIES]
    if bad or not presets or not families:
        return fail("ov2 bench flops", f"unknown preset or family {bad[0] if bad else '(none given)'!r}; presets: "
                                       f"{', '.join(PRESETS)}; families: {', '.join(FAMILIES)}")
    try:
        if args.save:
            check_writable(args.out, "cost_flops", args.force)
        records = count_all(presets, families, progress=not args.json)
        if args.json:
            print(json.dumps(records))
        else:
            print(render(records))
        if args.save:
            paths = write_results(args.out, "cost_flops", records, render(records), args.force)
            print("wrote " + ", ".join(paths), file=sys.stderr)
    except OutputExists as err:
        return fail("ov2 bench flops", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
