"""The one trainer for OpenVision 2, OpenVision (v1) and CLIP presets.

    python -m encoder train --preset ov2-tiny --out runs/demo            # CPU demo on built-in scenes
    torchrun --nproc_per_node=2 -m encoder train --preset ov1-tiny --out runs/v1 --distributed=fsdp
    python -m encoder train --out runs/demo --resume                     # continue exactly where it stopped

AdamW (b1 0.9, b2 0.95, decoupled weight decay on Linear/Conv weight matrices only), linear warm-up then
cosine to 0 within each stage, a fresh optimizer at each stage (stage 2 starts from stage 1's weights),
gradient accumulation, optional bf16 autocast, a NaN/inf guard (skip the step; stop after `nan_patience`
in a row), JSONL metrics, atomic checkpoints every `ckpt_every` steps and at the end of each stage. The steps
themselves run on `ov2.loop.run_steps`, checkpoints are saved and read by `ov2.checkpoint` and metrics written by
`ov2.runfolder.MetricsLog`, as for the bridge stages; this module supplies the data (resumable loader), the model +
losses, the LR schedule and what the checkpoints hold (encoder.checkpoint).

The run folder follows the contract of `ov2.runfolder`: everything is checked (config, saved config,
checkpoint) before anything is written; then the folder is locked, status.json says running -> ok / failed /
interrupted, and config.yaml, metrics.jsonl and checkpoints/ are written.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from encoder import checkpoint as ckpt
from encoder.config import (
    ARCHITECTURE,
    RESUME_SAFE,
    ConfigError,
    PretrainStageConfig,
    TrainConfig,
    accumulation,
    to_dict,
    upgrade,
    validate,
)
from encoder.data.loader import DataError, make_loader
from encoder.data.sources import open_source
from encoder.data.stream import StreamError, advance, check_layout
from encoder.data.stream import layout as stream_layout
from encoder.data.transforms import normalize
from encoder.models import build_losses, build_model, text_inputs
from ov2 import checkpoint as core
from ov2 import distributed as dist
from ov2 import runfolder
from ov2.loop import LoopConfig, NonFiniteLoss, run_steps, warmup_cosine
from ov2.precision import announce, resolve_bf16
from ov2.resume import check_out, check_resume, saved_config

MAX_EMPTY_TRIES = 10_000  # samples read in a row without a usable one before the run stops


TrainingStopped = NonFiniteLoss  # training cannot go on; the message says why


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


def lr_at(step_in_stage: int, stage: PretrainStageConfig) -> float:
    return stage.lr * warmup_cosine(step_in_stage, stage.steps, stage.warmup_steps)


def make_optimizer(module: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    decay_ids = {id(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    cuda = next(module.parameters()).device.type == "cuda"  # fused on a GPU; the plain loop on a CPU (bit-exact)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=cuda, foreach=False)


def _stage_bounds(cfg: TrainConfig) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for stage in cfg.stages:
        bounds.append((start, start + stage.steps))
        start += stage.steps
    return bounds


def _model_inputs(batch: dict, device: torch.device) -> dict:
    """Every batch entry but the counters, tensors moved to the device, the uint8 pixels normalised there (a quarter
    of float32's bytes cross from the workers and to the device); models take what they need (**kwargs)."""
    inputs = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
              if k not in ("seen", "bad", "stream")}
    inputs["pixels"] = normalize(inputs["pixels"])
    return inputs


def _check_weights(bundle: dict, module: nn.Module, path: str) -> None:
    """The checkpoint's tensors must be exactly the model's (names and shapes) before anything is loaded."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = core.sharded_shapes(path) if bundle.get("sharded") else \
        {k: tuple(v.shape) for k, v in bundle["weights"].items()}
    wrong = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if wrong:
        raise ConfigError(f"--resume: the checkpoint {path} does not fit this model "
                          f"(differs in {', '.join(wrong[:5])})")


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str, resume: bool = False):
        self.cfg, self.out = validate(cfg), out
        self.device = dist.setup()
        for stage in cfg.stages:  # every stage's global batch must split over the processes before anything runs
            accumulation(stage, dist.world_size(), cfg)
        check_out(out)
        runfolder.check_unlocked(out)
        self.resume_from, self.bundle = None, None
        if resume:
            found = core.newest(out, core.read)
            if found is None:
                raise ConfigError(f"--resume: no checkpoint found in {out}")
            self.resume_from, self.bundle = str(found[0]), found[1]
            check_resume(out, cfg, self.bundle["state"]["step"], upgrade(saved_config(out)), safe=RESUME_SAFE,
                         architecture=ARCHITECTURE)
        elif ckpt.list_checkpoints(out):
            raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        self.key = runfolder.config_key(to_dict(cfg))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.module = TrainModule(build_model(cfg.model), build_losses(cfg)).to(self.device)
        if cfg.activation_checkpointing:
            dist.checkpoint_blocks(self.module)
        if self.bundle is not None:
            _check_weights(self.bundle, self.module, self.resume_from)
        self.wrapped = dist.wrap(self.module, cfg.distributed, self.device, bf16=resolve_bf16(cfg.bf16, self.device)[0])
        saved_world = self.bundle["state"].get("world", 1) if self.bundle is not None else dist.world_size()
        if saved_world != dist.world_size() and dist.is_main():
            print(f"note: resuming on {dist.world_size()} process(es) a run saved by {saved_world}: the weights and "
                  f"optimizer state are re-sharded; each process's share of the data differs from an uninterrupted "
                  f"run's from here on", file=sys.stderr)
        torch.manual_seed(cfg.seed * 1000 + dist.rank() + 1)  # token dropping differs between ranks
        self.state = {"step": 0, "position": 0, "nan_streak": 0, "seen": 0, "bad": {}, "elapsed": 0.0,
                      "world": dist.world_size()}
        source = open_source(cfg.data, render_size=max(s.image_size for s in cfg.stages))
        self.source = source.split(dist.rank(), dist.world_size())
        self.streaming = getattr(self.source, "streaming", False)  # shards: per-rank cursors (encoder.data.stream)
        self.stream: dict = {"batches": 0, "workers": {}}
        self.layout = stream_layout(self.source, cfg.data.workers) if self.streaming else None
        if self.streaming and self.bundle is not None:
            self.stream = _stream_position(self.bundle, self.layout)
        self.empty_tries = 0
        self.metrics: runfolder.MetricsLog | None = None

    # --- bookkeeping -----------------------------------------------------------------------------------

    def _count(self, batch: dict) -> None:
        self.state["seen"] += batch["seen"]
        for reason, n in batch["bad"].items():
            self.state["bad"][reason] = self.state["bad"].get(reason, 0) + n
        n_bad = _unusable(self.state["bad"])
        limit = self.cfg.data.max_bad_fraction
        if self.state["seen"] >= 64 and n_bad > limit * self.state["seen"]:
            raise DataError(
                f"{n_bad} of {self.state['seen']} samples were unusable ({self.state['bad']}), more than "
                f"data.max_bad_fraction={limit}: check the data at {self.cfg.data.source!r}"
            )

    def _next_batch(self, it, batch_size: int) -> dict:
        while True:  # a batch with no usable sample is skipped (it is still counted)
            batch = next(it)
            if self.streaming:
                advance(self.stream, batch)
            else:
                self.state["position"] += batch_size
            self._count(batch)
            if "pixels" in batch:
                self.empty_tries = 0
                return batch
            self.empty_tries += batch["seen"]
            if self.empty_tries >= MAX_EMPTY_TRIES or (
                    not self.streaming and self.empty_tries >= 2 * len(self.source) + batch_size):
                raise DataError(f"no usable sample in {self.empty_tries} tries ({self.state['bad']}): check the "
                                f"data at {self.cfg.data.source!r}")

    def _local(self) -> dict:
        """What this rank saves of its own: a shard stream's cursors and the split they belong to."""
        if not self.streaming:
            return {}
        return {"stream": self.stream, "layout": self.layout}

    # --- the loop --------------------------------------------------------------------------------------

    def run(self) -> dict:
        if not dist.is_main():
            return self._loop()
        with runfolder.RunLock(self.out), runfolder.track(self.out, key=self.key, kind="pretrain"):
            os.makedirs(os.path.join(self.out, "checkpoints"), exist_ok=True)
            ckpt.remove_tmp(self.out)
            runfolder.write_config(self.out, to_dict(self.cfg))
            self.bf16 = announce(self.cfg.bf16, self.device, run=self.out)
            runfolder.rewrite_metrics(os.path.join(self.out, "metrics.jsonl"),
                                      self.bundle["state"]["step"] if self.bundle else 0)
            return self._loop()

    def _loop(self) -> dict:
        cfg = self.cfg
        if not dist.is_main():
            self.bf16 = announce(cfg.bf16, self.device, main=False)
        bounds = _stage_bounds(cfg)
        bar = tqdm(total=cfg.total_steps, disable=not dist.is_main(), desc=cfg.preset, dynamic_ncols=True)
        last: dict = {}
        if self.bundle is not None:
            self.state = {**ckpt.restore(self.bundle, self.wrapped), "world": dist.world_size()}
            bar.update(self.state["step"])
        self.metrics = runfolder.MetricsLog(self.out, elapsed=self.state.get("elapsed", 0.0), write=dist.is_main())
        try:
            for index, (stage, (start, end)) in enumerate(zip(cfg.stages, bounds)):
                optimizer = make_optimizer(self.module, cfg, stage.lr)
                if self.bundle is not None and start < self.state["step"] < end:  # stopped inside this stage
                    ckpt.restore_optimizer(self.bundle, self.wrapped, optimizer)
                if self.state["step"] >= end:
                    continue
                last = self._run_stage(index, stage, start, end, optimizer, bar)
        finally:
            self.bundle = None
            bar.close()
        dist.teardown()
        return last

    def _run_stage(self, index: int, stage: PretrainStageConfig, start: int, end: int, optimizer, bar) -> dict:
        cfg, state = self.cfg, self.state
        micro, accum = accumulation(stage, dist.world_size(), cfg)  # stage.batch_size is the global batch
        loader = make_loader(self.source, cfg.data, stage.image_size, micro, cfg.seed,
                             self.stream if self.streaming else state["position"], text_inputs(cfg.model))
        it = iter(loader)
        record: dict = {}
        clock = {"tick": time.perf_counter(), "samples": 0}

        def next_batch(step: int, micro_step: int) -> dict:
            batch = self._next_batch(it, micro)
            clock["samples"] += batch["pixels"].shape[0]
            return _model_inputs(batch, self.device)

        def set_lr(step: int) -> float:
            lr = lr_at(step - start, stage)
            for group in optimizer.param_groups:
                group["lr"] = lr
            return lr

        def log(step: int, lr: float, terms: dict) -> None:
            nonlocal record
            state["elapsed"] = self.metrics.elapsed()  # saved with the next checkpoint
            if step % cfg.log_every and step != end:
                return
            now = time.perf_counter()
            record = self.metrics.write(
                step, terms["loss"], lr, stage=index + 1, **{k: v for k, v in terms.items() if k != "loss"},
                samples_per_s=clock["samples"] * dist.world_size() / max(now - clock["tick"], 1e-9),
                seen=state["seen"], skipped=_unusable(state["bad"]), bad=dict(state["bad"]),
                bad_shards=state["bad"].get("bad_shard", 0))
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
            clock.update(tick=now, samples=0)

        loop = LoopConfig(grad_accum=accum, bf16=self.bf16, nan_patience=cfg.nan_patience,
                          ckpt_every=cfg.ckpt_every, max_grad_norm=cfg.max_grad_norm)
        run_steps(self.wrapped, optimizer, loop, state=state, end=end, batch=next_batch, loss=self.wrapped,
                  set_lr=set_lr, log=log, bar=bar, device=self.device,
                  save=lambda: ckpt.save_checkpoint(self.out, cfg, self.wrapped, optimizer, dict(state),
                                                    local=self._local()))
        return record


def _unusable(bad: dict) -> int:
    """Samples dropped, of the `bad` counts (unreadable shards are counted apart, as `bad_shard`)."""
    return sum(n for reason, n in bad.items() if reason != "bad_shard")


def _stream_position(bundle: dict, layout: dict) -> dict:
    """This rank's shard-stream cursors from a checkpoint, refused when the split differs."""
    local = bundle.get("local") or {}
    if "layout" not in local:
        raise StreamError(f"--resume: the checkpoint holds no shard-stream position for rank {dist.rank()} (it was "
                          f"written by fewer processes, or from another kind of source); resume with the processes "
                          f"and data source that wrote it")
    check_layout(local["layout"], layout)
    return local["stream"]


def train(cfg: TrainConfig, out: str, resume: bool = False) -> dict:
    return Trainer(cfg, out, resume).run()
