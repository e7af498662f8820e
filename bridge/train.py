"""One LLaVA training stage: the bridge's batches and answer loss on the one training loop (`ov2.loop`:
gradient accumulation, bf16 autocast on the model's device, NaN guard) and the one run-folder contract; freeze per
stage, AdamW with warm-up + cosine, checkpoints every `ckpt_every` steps and exact resume, tqdm, JSONL metrics.

Run folder of a stage (the same contract as a pretraining run, written and read by the same code):
    config.yaml              the stage's LlavaStageConfig
    status.json              running -> ok | failed | interrupted, key, wall time, peak memory (ov2.runfolder)
    metrics.jsonl            one line per optimizer step, the one schema (ov2.runfolder.MetricsLog): step, loss, lr,
                             elapsed_s, peak_rss_mb, then stage and tokens (answer tokens of the step's global batch)
    checkpoints/step_N/      model.safetensors (trainable parameters), optimizer.pt, rng_rank{R}.pt, trainer.json,
                             config.yaml: ov2.checkpoint.save / read (written atomically, verified on load)
    final.safetensors        the trained weights (trainable parameters only) once the stage is done
    done.json                summary (steps, final loss, wall time, peak memory); a finished stage is skipped
The sample order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
Under torchrun each rank trains on its share of every batch through the stage's engine (bridge.engine: DDP, or FSDP2
with `stage2.fsdp`, whose checkpoints are sharded: checkpoints/step_N/sharded/ instead of model.safetensors and
optimizer.pt).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bridge import engine
from bridge.assemble import trainable_groups
from bridge.config import RESUME_SAFE, LlavaStageConfig, upgrade
from bridge.engine import trainable_state
from encoder.data.loader import DataError
from ov2 import checkpoint as core
from ov2 import distributed as dist
from ov2 import runfolder
from ov2.config import ConfigError
from ov2.loop import LoopConfig, device_of, run_steps, warmup_cosine
from ov2.precision import announce
from ov2.resume import check_out, check_resume, saved_config


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """LLaVA's schedule: warm-up over a fraction of the steps, then the one cosine of every stage."""
    return warmup_cosine(step, total, max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0)


class SampleOrder:
    """Index of the g-th sample drawn: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def __call__(self, g: int) -> int:
        epoch = g // self.n
        if epoch not in self._perm:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=generator)}
        return int(self._perm[epoch][g % self.n])


def _check_names(model, shapes: dict, where) -> None:
    """Refuse saved weights (name -> shape) that do not fit `model`."""
    params = dict(model.named_parameters())
    unknown = [n for n in shapes if n not in params]
    wrong = [n for n in shapes if n in params and tuple(params[n].shape) != tuple(shapes[n])]
    if unknown or wrong:
        raise ConfigError(f"{where}: does not fit this model ({', '.join((unknown + wrong)[:3])}); was it trained "
                          f"with another encoder or LLM?")


def load_trainable(model, path: Path | dict) -> None:
    state = load_file(str(path)) if not isinstance(path, dict) else path
    _check_names(model, {n: t.shape for n, t in state.items()}, path if not isinstance(path, dict) else "checkpoint")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def latest_weights(out_dir: str | Path) -> Path | None:
    """The stage's trained weights: final.safetensors when done, else its newest intact checkpoint's."""
    out_dir = Path(out_dir)
    if (out_dir / "final.safetensors").is_file():
        return out_dir / "final.safetensors"
    found = core.newest(out_dir, core.read_weights)
    return found[0] / core.WEIGHTS if found else None


class StepBatches(torch.utils.data.Dataset):
    """Micro-batch k of a rank (k = step x grad_accum + micro): its records drawn by `order`, collated. A pure
    function of k, so DataLoader workers can build them ahead and a resumed stage sees the same batches."""

    def __init__(self, dataset, collate, order: SampleOrder, batch_size: int, rank: int, world: int):
        self.dataset, self.collate, self.order = dataset, collate, order
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[int, dict]:
        first = k * self.batch_size
        return k, self.collate([self.dataset[self.order(first + j)] for j in range(self.rank, self.batch_size,
                                                                                     self.world)])


def batch_loader(dataset, collate, order: SampleOrder, cfg: LlavaStageConfig, step: int, rank: int, world: int):
    """The stage's micro-batches from `step` on, built by `cfg.workers` DataLoader processes (0: in this one)."""
    data = StepBatches(dataset, collate, order, cfg.batch_size, rank, world)
    return torch.utils.data.DataLoader(
        data, batch_size=None, sampler=itertools.count(step * cfg.grad_accum), num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None, persistent_workers=False, generator=torch.Generator(),
        pin_memory=torch.cuda.is_available())


def train_stage(model, dataset, collate, cfg: LlavaStageConfig, out_dir: str | Path, *,
                stop_after: int | None = None, inputs: tuple = ()) -> dict:
    """Train one stage in place on `model`; -> summary dict. `stop_after` ends early (as an interruption would).
    `inputs` (keys of what the stage starts from: encoder, LLM) go into the stage's key."""
    out_dir = Path(out_dir)
    check_out(out_dir)
    runfolder.check_unlocked(out_dir)
    groups = trainable_names(model, cfg)  # names only: a parameter held here would outlive FSDP2's sharding
    done = out_dir / "done.json"
    found = core.newest(out_dir, core.read)
    step = found[1]["state"]["step"] if found else 0
    check_resume(out_dir, cfg, step, upgrade(saved_config(out_dir)), safe=RESUME_SAFE)
    if found:
        weights = found[1]["weights"]
        shapes = core.sharded_shapes(found[0]) if weights is None else {n: t.shape for n, t in weights.items()}
        _check_names(model, shapes, found[0])
    if done.is_file() and (out_dir / "final.safetensors").is_file():
        summary = json.loads(done.read_text())
        if summary.get("steps", 0) >= cfg.steps:
            load_trainable(model, out_dir / "final.safetensors")
            return summary
    sharded = cfg.fsdp and dist.world_size() > 1
    if found and sharded and found[1]["weights"] is not None:
        raise ConfigError(f"{found[0]} was written by one process (whole weights); a stage{cfg.stage}.fsdp resume "
                          f"needs a sharded checkpoint: resume on 1 process, or start {out_dir} again")
    key = runfolder.config_key(asdict(cfg), *inputs)
    main = dist.is_main()  # under torchrun rank 0 owns the folder; every rank trains
    dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    with contextlib.ExitStack() as owner:
        if main:
            owner.enter_context(runfolder.RunLock(out_dir))
            owner.enter_context(runfolder.track(out_dir, key=key, kind=f"bridge_stage{cfg.stage}"))
            runfolder.write_config(out_dir, asdict(cfg))
            runfolder.rewrite_metrics(out_dir / "metrics.jsonl", step)
        bf16 = announce(cfg.bf16, device_of(model), run=out_dir if main else None, main=main)
        if cfg.gradient_checkpointing:  # each decoder layer recomputes its activations in the backward pass
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
        root = engine.wrap(model, sharded, bf16, device_of(model))  # before the optimizer: FSDP2 swaps parameters
        opt = _optimizer(model, groups, cfg)
        state = {"step": 0, "nan_streak": 0, "elapsed": 0.0, "seen": 0, "bad": {}}
        if found and found[1].get("sharded"):
            engine.load_sharded(model, opt, found[1]["sharded"])
        elif found:
            load_trainable(model, found[1]["weights"])
            opt.load_state_dict(found[1]["optimizer"])
        if found:
            core.restore_rng(found[1])
            state.update(found[1]["state"])
        summary = _loop(model, root, dataset, collate, cfg, out_dir, opt, state, stop_after, bf16)
    if main and summary["steps"] < cfg.steps:
        runfolder.write_status(out_dir, "interrupted", error=f"stopped at step {summary['steps']}")
    return summary


def trainable_names(model, cfg: LlavaStageConfig) -> dict[str, list[str]]:
    """{group: parameter names} of what the stage trains (bridge.assemble.trainable_groups sets requires_grad). Only
    names leave: a reference to an unsharded parameter kept past `engine.wrap` would hold its whole storage on every
    rank (a float32 copy of the LLM per GPU)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {group: [names[id(p)] for p in params] for group, params in
            trainable_groups(model, stage=cfg.stage, unfreeze_vision=cfg.unfreeze_vision).items()}


def _optimizer(model, groups: dict[str, list[str]], cfg: LlavaStageConfig) -> torch.optim.Optimizer:
    """AdamW over the groups' parameters (by name), as they are now: FSDP2 replaces them with sharded ones."""
    rates = {"vision": cfg.vision_lr, "projector": cfg.projector_lr or cfg.lr}
    params = dict(model.named_parameters())
    param_groups = [{"params": [params[n] for n in names], "lr": rates.get(name, cfg.lr), "name": name}
                    for name, names in groups.items()]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def _loop(model, root, dataset, collate, cfg: LlavaStageConfig, out_dir: Path, opt, state: dict, stop_after,
          bf16: bool) -> dict:
    """The stage's steps on the one training loop (ov2.loop) from `state` (step, nan_streak, elapsed; updated in
    place): the bridge supplies batches and the loss (through `root`, the engine's module: bridge.engine)."""
    order = SampleOrder(len(dataset), cfg.seed)
    device = device_of(model)
    root.train()
    step = state["step"]
    t0, last, saved, tokens = time.time(), {}, {"step": step}, {"n": 0}
    metrics = runfolder.MetricsLog(out_dir, elapsed=state["elapsed"], write=dist.is_main())
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {cfg.stage}", disable=not cfg.progress or not dist.is_main())

    rank, world = dist.rank(), dist.world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"stage{cfg.stage}.batch_size {cfg.batch_size} does not split over {world} processes")

    batches = iter(batch_loader(dataset, collate, order, cfg, step, rank, world))

    def batch(step: int, micro: int) -> dict:  # this rank's share of the global batch
        index, items = next(batches)
        assert index == step * cfg.grad_accum + micro, (index, step, micro)  # the loader follows the loop
        count_skipped(items.pop("records", 0), items.pop("skipped", {}))
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in items.items()}

    def count_skipped(records: int, skipped: dict) -> None:  # missing / unreadable images: skipped and counted
        state["seen"] = state.get("seen", 0) + records
        bad = state.setdefault("bad", {})
        for reason, n in skipped.items():
            bad[reason] = bad.get(reason, 0) + n
        if state["seen"] >= 64 and sum(bad.values()) > cfg.max_bad_fraction * state["seen"]:
            raise DataError(f"{sum(bad.values())} of {state['seen']} records were unusable ({bad}), more than "
                            f"stage{cfg.stage}.max_bad_fraction={cfg.max_bad_fraction}: check the data")

    def loss(inputs: dict) -> dict:
        out = root(inputs)
        if world == 1:
            tokens["n"] += out["tokens"].detach()  # read once per step, by log(): no host sync per micro-step
            return {"loss": out["lm_loss"]}
        # Mean over the global batch's answer tokens, not a mean of the ranks' means: each rank's share is weighted
        # by its tokens, so the averaged gradients equal one process's on the whole batch.
        counts = torch.stack([out["tokens"].float(), out["lm_loss"].detach().float() * out["tokens"]])
        dist.all_reduce_sum_(counts)
        tokens["n"] += counts[0].detach()
        return {"loss": out["lm_loss"] * out["tokens"] * world / counts[0], "global": counts[1] / counts[0]}

    def set_lr(step: int) -> float:
        factor = lr_factor(step, cfg.steps, cfg.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        return cfg.lr * factor

    def log(step: int, lr: float, terms: dict) -> None:  # the global batch's loss and answer tokens
        state["elapsed"] = metrics.elapsed()
        last.update(metrics.write(step, terms.get("global", terms["loss"]), lr, stage=cfg.stage,
                                  tokens=int(tokens["n"])))
        tokens["n"] = 0
        bar.set_postfix(loss=f"{last['loss']:.4f}")

    def save() -> None:
        if engine.is_sharded(model):  # every rank writes its part
            core.save(out_dir, state["step"], weights={}, optimizer={}, config=asdict(cfg), state=dict(state),
                      keep_last=cfg.keep_last, sharded=engine.sharded_state(model, opt))
        else:  # rank 0 writes the weights and optimizer state (all ranks hold the same)
            main = dist.is_main()
            core.save(out_dir, state["step"], weights=trainable_state(model) if main else {},
                      optimizer=opt.state_dict() if main else {}, config=asdict(cfg), state=dict(state),
                      keep_last=cfg.keep_last)
        saved["step"] = state["step"]

    loop = LoopConfig(grad_accum=cfg.grad_accum, bf16=bf16, nan_patience=cfg.nan_patience,
                      ckpt_every=cfg.ckpt_every, max_grad_norm=cfg.max_grad_norm)
    run_steps(root, opt, loop, state=state, end=end, batch=batch, loss=loss, set_lr=set_lr, log=log,
              save=save, bar=bar, device=device)
    bar.close()
    root.eval()
    summary = {"stage": cfg.stage, "steps": saved["step"], "final_loss": last.get("loss"),
               "records": state.get("seen", 0), "skipped": dict(state.get("bad", {})),
               "seconds": round(time.time() - t0, 2), "peak_rss_mb": runfolder.peak_rss_mb()}
    if saved["step"] >= cfg.steps:
        weights = engine.full_trainable(model)  # a collective when sharded
        if dist.is_main():
            save_file(weights, str(out_dir / "final.safetensors"))
            (out_dir / "done.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary
