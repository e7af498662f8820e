"""Bridge options on a CPU budget: the stage-2 step time of each option, and (--accuracy) its held-in accuracy after
the default experiment's bridge recipe.

    ov2 bench bridge-options                          # step times (a few minutes), precision as `auto` picks it
    ov2 bench bridge-options --encoder runs/default/encoders/openvision2/export/encoder --accuracy \\
        --work runs/bridge-options                    # + one bridge and one held-in evaluation per option

Options (bridge config keys): full (LLaVA-1.5: projector + the whole LLM), lora-r16 and lora-r128 (LoRA adapters on
a frozen LLM, `stage2.lora_r`, at LLaVA-1.5's LoRA LR 2e-4; r 128 / alpha 256 is its published recipe), tokens-16
(`image_size: 32`: a 64 px tower of patch 8 fed 32 px images, 16 visual tokens instead of 64; a standard LLaVA
export cannot pool tokens, its tower can take smaller images), layers-8 and layers-4 (`llm_layers`: the LLM cut to
its first 8 or 4 decoder layers of SmolLM2's 30; the export is a standard LLaVA of that depth).
Measured beside them, not a key: the frozen tower's share of a stage-2 step, the most that computing its features
once per image and reusing them could save.
Step times: one process builds one model per option, times full optimizer steps on one fixed built-in batch, the
options interleaved round by round (median of the rounds, ratio to full). Accuracy: `ov2 bridge train` with the
default experiment's `bridge.overrides` plus the option, then `ov2 eval` on the held-in tasks (its `stage2_tasks`).
Writes NAME.md and NAME.json (default benchmarks/results/bridge_options_cpu), never over existing ones without
--force.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench.bridge_step import bench_parser, cpu_flags, timed_step
from benchmarks.bench.results import OutputExists, check_writable, write_results
from ov2.cli import fail

OPTIONS = {"full": {}, "lora-r16": {"stage2.lora_r": 16, "stage2.lr": 2e-4},
           "lora-r128": {"stage2.lora_r": 128, "stage2.lr": 2e-4}, "tokens-16": {"image_size": 32},
           "layers-8": {"llm_layers": 8}, "layers-4": {"llm_layers": 4}}
DEFAULT_OPTIONS = ("full", "lora-r16", "lora-r128", "tokens-16")  # layers-N: on request (--options), N < the LLM's
DEFAULT_EXPERIMENT = Path(__file__).resolve().parents[1] / "runner" / "experiments" / "default.yaml"


def _model(encoder: str, llm: str, option: dict):
    from bridge.config import BridgeConfig
    from bridge.lora import add_lora
    from bridge.pipeline import build, datasets

    cfg = BridgeConfig(encoder=encoder, llm=llm, out="unused", **{k: v for k, v in option.items() if "." not in k})
    model, processor, tower = build(cfg)
    if option.get("stage2.lora_r"):
        r = option["stage2.lora_r"]
        add_lora(model, r=r, alpha=2 * r, seed=0)
    return model, processor, tower, datasets(cfg, tower.image_size)[1]


def measure(encoder: str, llm: str, batch: int, steps: int, repeats: int, progress: bool = True,
            names: tuple[str, ...] = DEFAULT_OPTIONS) -> tuple[list, dict]:
    import torch

    from bridge.assemble import trainable_groups
    from bridge.data import Collator
    from bridge.loss import AnswerLoss
    from ov2.precision import resolve_bf16

    bf16, why = resolve_bf16("auto", "cpu")
    models = {}
    for name, option in ((n, OPTIONS[n]) for n in names):
        model, processor, tower, data = _model(encoder, llm, option)
        collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
        groups = trainable_groups(model, stage=2)
        params = [p for ps in groups.values() for p in ps]
        models[name] = (model.train(), torch.optim.AdamW(params, lr=1e-7), sum(p.numel() for p in params),
                        collate([data[i] for i in range(batch)]))  # the same records, as each option tokenises them
    loss_fn = AnswerLoss()
    times: dict[str, list[float]] = {name: [] for name in [*names, "tower"]}
    for r in range(repeats + 1):  # round 0 warms every option up (optimizer state allocated, not timed)
        for name, (model, opt, _, fixed) in models.items():
            for _ in range(steps):
                seconds = timed_step(model, opt, loss_fn, fixed, bf16)
                if r:
                    times[name].append(seconds)
        model, fixed = next(iter(models.values()))[0], next(iter(models.values()))[3]
        for _ in range(steps):  # the frozen tower alone, as a training step runs it (no gradient)
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.model.get_image_features(pixel_values=fixed["pixel_values"])
            if r:
                times["tower"].append(time.perf_counter() - start)
        if progress:
            print(f"round {r}/{repeats} done", file=sys.stderr)
    full = statistics.median(times[names[0]])
    tokens = {name: int(batch["attention_mask"].sum()) for name, (*_, batch) in models.items()}
    tokens["tower"] = tokens[names[0]]  # the tower row runs on the first option's batch
    rows = [{"option": name, "median_s": statistics.median(ts), "min_s": min(ts), "n": len(ts),
             "ratio_to_full": statistics.median(ts) / full,
             "trainable_params": models[name][2] if name in models else 0, "tokens": tokens[name]}
            for name, ts in times.items()]
    return rows, {"bf16": bf16, "precision_reason": why, "tokens": rows[0]["tokens"]}


def held_in_accuracy(encoder: str, work: Path, limit: int, progress: bool = True,
                     names: tuple[str, ...] = DEFAULT_OPTIONS) -> dict[str, dict]:
    """{option: {task: {value, stderr, n}}} after the default experiment's bridge recipe plus each option."""
    import yaml

    from benchmarks.runner.experiment import from_dict
    from benchmarks.runner.plan import _args, bridge_overrides

    exp = from_dict(yaml.safe_load(DEFAULT_EXPERIMENT.read_text()))
    tasks = exp.bridge.overrides.get("stage2_tasks", "")
    out = {}
    for name, option in ((n, OPTIONS[n]) for n in names):
        folder = work / name
        args = {**bridge_overrides(exp, encoder, folder / "bridge"), **option}
        if not (folder / "eval" / "scores.json").is_file():  # a finished option is not run again
            for step in (["bridge", "train", "--encoder", encoder, "--llm", exp.bridge.llm,
                          "--out", str(folder / "bridge"), *_args(args)],
                         ["eval", str(folder / "bridge" / "model"), "--tasks", tasks, "--limit", str(limit),
                          "--out", str(folder / "eval")]):
                if progress:
                    print(f"{name}: ov2 {' '.join(step[:2])} ...", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "ov2", *step], check=True, stdout=subprocess.DEVNULL)
        scores = json.loads((folder / "eval" / "scores.json").read_text())["tasks"]
        out[name] = {t: {**s["metrics"][s["primary"]], "n": s["n"], "primary": s["primary"]} for t, s in scores.items()}
    return out


def table(rows: list[dict], accuracy: dict | None, meta: dict) -> str:
    lines = [f"# Bridge options: {meta['llm']} + {meta['encoder']}, stage 2, batch {meta['batch']}", "",
             f"`{meta['command']}` on {meta['machine']} (CPU flags: {meta['flags']}; torch CPU capability "
             f"{meta['capability']}; {meta['threads']} threads; precision: {meta['precision']}).", "",
             f"| option | median s/step | min s/step | steps | ratio to {rows[0]['option']} | trainable params | "
             f"tokens per batch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "tower forward only (caching bound)" if r["option"] == "tower" else r["option"]
        lines.append(f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['n']} | {r['ratio_to_full']:.2f} | "
                     f"{r['trainable_params'] / 1e6:.1f} M | {r['tokens']} |")
    if accuracy:
        tasks = list(next(iter(accuracy.values())))
        lines += ["", f"Held-in accuracy (primary metric ± stderr; n = {meta['limit']} per task):", "",
                  "| option | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, scores in accuracy.items():
            cells = [f"{s['value']:.3g} ± {s['stderr'] or 0:.2g}" for s in scores.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("ov2 bench bridge-options", __doc__, "bridge_options_cpu", "option")
    parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                        help=f"comma list of {', '.join(OPTIONS)} (default {','.join(DEFAULT_OPTIONS)}; the first is "
                             f"the ratios' base)")
    parser.add_argument("--accuracy", action="store_true", help="also train and evaluate each option (minutes each)")
    parser.add_argument("--work", default="runs/bridge-options", help="where --accuracy trains (resumable)")
    parser.add_argument("--limit", type=int, default=100, help="questions per held-in task (--accuracy)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    prog = "ov2 bench bridge-options"
    if min(args.batch, args.steps, args.repeats, args.limit) < 1:
        return fail(prog, "--batch, --steps, --repeats and --limit must be at least 1")
    names = tuple(o for o in args.options.split(",") if o)
    if not names or set(names) - set(OPTIONS):
        return fail(prog, f"--options: choose from {', '.join(OPTIONS)}, got {args.options!r}")
    try:
        check_writable(str(out.parent), out.name, args.force, ("json", "md"))
    except OutputExists as err:
        return fail(prog, err)
    import torch

    from ov2.config import ConfigError

    try:
        rows, info = measure(args.encoder, args.llm, args.batch, args.steps, args.repeats, names=names)
        accuracy = held_in_accuracy(args.encoder, Path(args.work), args.limit, names=names) if args.accuracy \
            else None
    except (ConfigError, FileNotFoundError) as err:
        return fail(prog, err)
    except subprocess.CalledProcessError as err:
        return fail(prog, f"ov2 {' '.join(err.cmd[3:5])} failed with exit code {err.returncode}")
    meta = {"encoder": args.encoder, "llm": args.llm, "batch": args.batch, "flags": cpu_flags(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "precision": "bf16 autocast" if info["bf16"] else "float32",
            "tokens": info["tokens"], "limit": args.limit,
            "command": "ov2 bench bridge-options " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = table(rows, accuracy, meta)
    print(text)
    write_results(str(out.parent), out.name, rows + ([{"accuracy": accuracy}] if accuracy else []), text, args.force,
                  formats=("json", "md"), meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
