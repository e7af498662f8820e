"""The one trainer for OpenVision 2, OpenVision (v1) and CLIP presets.

    python -m encoder train --preset ov2-tiny --out runs/demo            # CPU demo on built-in scenes
    torchrun --nproc_per_node=2 -m encoder train --preset ov1-tiny --out runs/v1 --distributed=fsdp
    python -m encoder train --out runs/demo --resume                     # continue exactly where it stopped

AdamW (b1 0.9, b2 0.95, decoupled weight decay on Linear/Conv weight matrices only), linear warm-up then
cosine to 0 within each stage, a fresh optimizer at each stage (stage 2 starts from stage 1's weights),
gradient accumulation, optional bf16 autocast, a NaN/inf guard (skip the step; stop after `nan_patience`
in a row), JSONL metrics, atomic checkpoints every `ckpt_every` steps and at the end of each stage.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from encoder import checkpoint as ckpt
from encoder import distributed as dist
from encoder.config import ConfigError, StageConfig, TrainConfig, validate
from encoder.data.loader import DataError, make_loader
from encoder.data.sources import open_source
from encoder.models import build_losses, build_model


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite losses, bad data); the message says why."""


class TrainModule(nn.Module):
    """The model and its losses in one module (losses may own parameters, e.g. a temperature)."""

    def __init__(self, model: nn.Module, losses: list[nn.Module]):
        super().__init__()
        self.model = model
        self.losses = nn.ModuleList(losses)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(**batch)
        terms: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            terms.update(loss(out))
        terms["loss"] = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return terms


def lr_at(step_in_stage: int, stage: StageConfig) -> float:
    if step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    progress = (step_in_stage - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(module: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    decay_ids = {id(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)


def _stage_bounds(cfg: TrainConfig) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for stage in cfg.stages:
        bounds.append((start, start + stage.steps))
        start += stage.steps
    return bounds


def _model_inputs(batch: dict, device: torch.device) -> dict:
    """Every batch entry but the counters, tensors moved to the device; models take what they need (**kwargs)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k not in ("seen", "bad")}


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str, resume: bool = False):
        self.cfg, self.out = validate(cfg), out
        self.device = dist.setup()
        if not resume and ckpt.latest_checkpoint(out):
            raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.module = TrainModule(build_model(cfg.model), build_losses(cfg)).to(self.device)
        self.wrapped = dist.wrap(self.module, cfg.distributed, self.device)
        torch.manual_seed(cfg.seed * 1000 + dist.rank() + 1)  # token dropping differs between ranks
        self.state = {"step": 0, "position": 0, "nan_streak": 0, "seen": 0, "bad": {}, "elapsed": 0.0}
        self.resume_from = ckpt.latest_checkpoint(out) if resume else None
        if resume and self.resume_from is None:
            raise ConfigError(f"--resume: no checkpoint found in {out}")
        source = open_source(cfg.data, render_size=max(s.image_size for s in cfg.stages))
        self.source = source.split(dist.rank(), dist.world_size())
        if dist.is_main():
            os.makedirs(out, exist_ok=True)
            ckpt.save_config(cfg, os.path.join(out, "config.yaml"))

    # --- bookkeeping -----------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if dist.is_main():
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """After a resume, drop metric lines written after the checkpoint (they will be written again)."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not dist.is_main() or not os.path.exists(path):
            return
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("step", 0) <= self.state["step"]]
        with open(path, "w") as f:
            f.writelines(keep)

    def _count(self, batch: dict) -> None:
        self.state["seen"] += batch["seen"]
        for reason, n in batch["bad"].items():
            self.state["bad"][reason] = self.state["bad"].get(reason, 0) + n
        n_bad = sum(self.state["bad"].values())
        limit = self.cfg.data.max_bad_fraction
        if self.state["seen"] >= 64 and n_bad > limit * self.state["seen"]:
            raise DataError(
                f"{n_bad} of {self.state['seen']} samples were unusable ({self.state['bad']}), more than "
                f"data.max_bad_fraction={limit}: check the data at {self.cfg.data.source!r}"
            )

    def _next_batch(self, it, batch_size: int) -> dict:
        while True:  # a batch with no usable sample is skipped (it is still counted)
            batch = next(it)
            self.state["position"] += batch_size
            self._count(batch)
            if "pixels" in batch:
                return batch

    # --- the loop --------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        bounds = _stage_bounds(cfg)
        bar = tqdm(total=cfg.total_steps, disable=not dist.is_main(), desc=cfg.preset, dynamic_ncols=True)
        last: dict = {}
        if self.resume_from:
            self.state = ckpt.load_checkpoint(self.resume_from, self.wrapped)
            self._trim_metrics()
            bar.update(self.state["step"])
        for index, (stage, (start, end)) in enumerate(zip(cfg.stages, bounds)):
            optimizer = make_optimizer(self.module, cfg, stage.lr)
            if self.resume_from and start < self.state["step"] < end:  # stopped inside this stage
                ckpt.load_optimizer(self.resume_from, self.wrapped, optimizer)
            if self.state["step"] >= end:
                continue
            last = self._run_stage(index, stage, start, end, optimizer, bar)
        bar.close()
        dist.teardown()
        return last

    def _run_stage(self, index: int, stage: StageConfig, start: int, end: int, optimizer, bar) -> dict:
        cfg, state = self.cfg, self.state
        loader = make_loader(self.source, cfg.data, stage.image_size, stage.batch_size, cfg.seed, state["position"],
                             cfg.model.decoder.max_len)
        it = iter(loader)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        record: dict = {}
        tick, samples = time.perf_counter(), 0
        while state["step"] < end:
            lr = lr_at(state["step"] - start, stage)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = self._next_batch(it, stage.batch_size)
                samples += batch["pixels"].shape[0]
                sync = micro == cfg.grad_accum - 1 or not hasattr(self.wrapped, "no_sync")
                with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), autocast:
                    terms = self.wrapped(_model_inputs(batch, self.device))
                (terms["loss"] / cfg.grad_accum).backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if dist.all_reduce_max(0.0 if math.isfinite(terms_sum["loss"]) else 1.0) > 0:  # skip on every rank
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] += 1
                if state["nan_streak"] >= cfg.nan_patience:
                    raise TrainingStopped(f"loss was not finite for {state['nan_streak']} steps in a row at step "
                                          f"{state['step']}: lower the learning rate or check the data")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] = 0
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == end:
                now = time.perf_counter()
                state["elapsed"] += now - tick
                record = {"step": state["step"], "stage": index + 1, "lr": lr, **terms_sum,
                          "samples_per_s": samples * dist.world_size() / max(now - tick, 1e-9),
                          "seen": state["seen"], "skipped": sum(state["bad"].values()), "bad": dict(state["bad"]),
                          "elapsed_s": state["elapsed"]}
                self._log(record)
                bar.set_postfix(loss=f"{terms_sum['loss']:.3f}", lr=f"{lr:.2e}")
                tick, samples = now, 0
            if state["step"] % cfg.ckpt_every == 0 or state["step"] == end:
                ckpt.save_checkpoint(self.out, cfg, self.wrapped, optimizer, dict(state))
        return record


def train(cfg: TrainConfig, out: str, resume: bool = False) -> dict:
    return Trainer(cfg, out, resume).run()
