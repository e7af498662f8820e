"""One LLaVA training stage: the bridge's batches and answer loss on the one training loop (`ov2.loop`:
gradient accumulation, bf16 autocast on the model's device, NaN guard) and the one run-folder contract; freeze per
stage, AdamW with warm-up + cosine, checkpoints every `save_every` steps and exact resume, tqdm, JSONL metrics.

Run folder of a stage (the same contract as a pretraining run, read by the same code):
    config.yaml              the stage's StageConfig
    status.json              running -> ok | failed | interrupted, key, wall time, peak memory (ov2.runfolder)
    metrics.jsonl            one line per optimizer step: stage, step, loss, lr, tokens, seconds, peak_rss_mb
    checkpoints/step_N/      model.safetensors (trainable parameters), optimizer.pt, rng_rank0.pt, trainer.json,
                             config.yaml: written atomically, verified on load (ov2.checkpoint)
    final.safetensors        the trained weights (trainable parameters only) once the stage is done
    done.json                summary (steps, final loss, wall time, peak memory); a finished stage is skipped
The sample order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bridge.assemble import trainable_groups
from bridge.config import DEFAULT_LR, StageConfig  # noqa: F401  (StageConfig is imported from here by callers)
from bridge.loss import AnswerLoss
from ov2 import checkpoint as core
from ov2 import distributed as dist
from ov2 import runfolder
from ov2.config import ConfigError
from ov2.loop import LoopConfig, device_of, run_steps, warmup_cosine
from ov2.resume import check_out, check_resume


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


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_names(model, state: dict, where) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    wrong = [n for n in state if n in params and tuple(params[n].shape) != tuple(state[n].shape)]
    if unknown or wrong:
        raise ConfigError(f"{where}: does not fit this model ({', '.join((unknown + wrong)[:3])}); was it trained "
                          f"with another encoder or LLM?")


def load_trainable(model, path: Path | dict) -> None:
    state = load_file(str(path)) if not isinstance(path, dict) else path
    _check_names(model, state, path if not isinstance(path, dict) else "checkpoint")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _read_ckpt(path: Path) -> dict:
    rng = path / f"rng_rank{dist.rank()}.pt"
    return {"model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "rng": torch.load(rng, weights_only=True) if rng.is_file() else None,
            "state": core.read_state(path)}


def _save_ckpt(model, opt, step: int, cfg: StageConfig, out_dir: Path) -> Path:
    """Collective under torchrun (every rank saves its RNG state; rank 0 the rest, and renames once)."""
    final = core.step_path(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main():
        core.begin(out_dir, step)
    dist.barrier()
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        core.commit(tmp, {"step": step}, cfg.keep_last)
    dist.barrier()
    return final


def latest_weights(out_dir: str | Path) -> Path | None:
    """The stage's trained weights: final.safetensors when done, else its newest intact checkpoint's."""
    out_dir = Path(out_dir)
    if (out_dir / "final.safetensors").is_file():
        return out_dir / "final.safetensors"
    found = core.newest(out_dir, lambda p: load_file(str(p / "model.safetensors")))
    return found[0] / "model.safetensors" if found else None


def train_stage(model, dataset, collate, cfg: StageConfig, out_dir: str | Path, *,
                stop_after: int | None = None, inputs: tuple = ()) -> dict:
    """Train one stage in place on `model`; -> summary dict. `stop_after` ends early (as an interruption would).
    `inputs` (keys of what the stage starts from: encoder, LLM) go into the stage's key."""
    out_dir = Path(out_dir)
    check_out(out_dir)
    runfolder.check_unlocked(out_dir)
    groups = trainable_groups(model, stage=cfg.stage, unfreeze_vision=cfg.unfreeze_vision)
    done = out_dir / "done.json"
    found = core.newest(out_dir, _read_ckpt)
    step = found[1]["state"]["step"] if found else 0
    check_resume(out_dir, cfg, step)
    if found:
        _check_names(model, found[1]["model"], found[0])
    if done.is_file() and (out_dir / "final.safetensors").is_file():
        summary = json.loads(done.read_text())
        if summary.get("steps", 0) >= cfg.steps:
            load_trainable(model, out_dir / "final.safetensors")
            return summary
    rates = {"vision": cfg.vision_lr, "projector": cfg.projector_lr or cfg.lr}
    param_groups = [{"params": ps, "lr": rates.get(name, cfg.lr), "name": name} for name, ps in groups.items()]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    key = runfolder.config_key(asdict(cfg), *inputs)
    main = dist.is_main()  # under torchrun rank 0 owns the folder; every rank trains
    dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    with contextlib.ExitStack() as owner:
        if main:
            owner.enter_context(runfolder.RunLock(out_dir))
            owner.enter_context(runfolder.track(out_dir, key=key, kind=f"bridge_stage{cfg.stage}"))
            tmp = out_dir / f".config.yaml.{os.getpid()}.tmp"
            tmp.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
            os.replace(tmp, out_dir / "config.yaml")
            runfolder.rewrite_metrics(out_dir / "metrics.jsonl", step)
        if found:
            load_trainable(model, found[1]["model"])
            opt.load_state_dict(found[1]["optimizer"])
            if found[1]["rng"] is not None:
                torch.set_rng_state(found[1]["rng"])
        summary = _loop(model, dataset, collate, cfg, out_dir, opt, step, stop_after)
    if main and summary["steps"] < cfg.steps:
        runfolder.write_status(out_dir, "interrupted", error=f"stopped at step {summary['steps']}")
    return summary


def _loop(model, dataset, collate, cfg: StageConfig, out_dir: Path, opt, step: int, stop_after) -> dict:
    """The stage's steps on the one training loop (ov2.loop): the bridge supplies batches and the loss."""
    loss_fn = AnswerLoss()
    order = SampleOrder(len(dataset), cfg.seed)
    device = device_of(model)
    model.train()
    t0, last, saved, tokens = time.time(), {}, {"step": step}, {"n": 0}
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {cfg.stage}", disable=not cfg.progress or not dist.is_main())

    rank, world = dist.rank(), dist.world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"stage{cfg.stage}.batch_size {cfg.batch_size} does not split over {world} processes")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def batch(step: int, micro: int) -> dict:  # this rank's share of the global batch
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        items = collate([dataset[order(first + j)] for j in range(rank, cfg.batch_size, world)])
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in items.items()}

    def loss(inputs: dict) -> dict:
        out = loss_fn(model, inputs)
        if world == 1:
            tokens["n"] += int(out["tokens"])
            return {"loss": out["lm_loss"]}
        # Mean over the global batch's answer tokens, not a mean of the ranks' means: each rank's share is weighted
        # by its tokens, so the averaged gradients equal one process's on the whole batch.
        counts = torch.stack([out["tokens"].float(), out["lm_loss"].detach().float() * out["tokens"]])
        torch.distributed.all_reduce(counts)
        tokens["n"] += int(counts[0])
        return {"loss": out["lm_loss"] * out["tokens"] * world / counts[0], "global": counts[1] / counts[0]}

    def set_lr(step: int) -> float:
        factor = lr_factor(step, cfg.steps, cfg.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        return cfg.lr * factor

    def average_gradients() -> None:  # what DDP would do; the LLaVA model is called part by part, not wrapped
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world

    with (out_dir / "metrics.jsonl").open("a") if dist.is_main() else contextlib.nullcontext() as log_file:
        def log(step: int, lr: float, terms: dict) -> None:  # the global batch's loss and answer tokens
            last.update(stage=cfg.stage, step=step, loss=terms.get("global", terms["loss"]), lr=lr, tokens=tokens["n"],
                        seconds=round(time.time() - t0, 3), peak_rss_mb=runfolder.peak_rss_mb())
            tokens["n"] = 0
            if log_file is not None:
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}")

        def save() -> None:
            _save_ckpt(model, opt, state["step"], cfg, out_dir)
            saved["step"] = state["step"]

        state = {"step": step, "nan_streak": 0}
        loop = LoopConfig(grad_accum=cfg.grad_accum, bf16=cfg.bf16, nan_patience=cfg.nan_patience,
                          ckpt_every=cfg.save_every)
        run_steps(model, opt, loop, state=state, end=end, batch=batch, loss=loss, set_lr=set_lr, log=log,
                  save=save, bar=bar, device=device, before_step=average_gradients if world > 1 else None)
    bar.close()
    model.eval()
    summary = {"stage": cfg.stage, "steps": saved["step"], "final_loss": last.get("loss"),
               "seconds": round(time.time() - t0, 2), "peak_rss_mb": runfolder.peak_rss_mb()}
    if saved["step"] >= cfg.steps and dist.is_main():
        save_file(trainable_state(model), str(out_dir / "final.safetensors"))
        (out_dir / "done.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary
