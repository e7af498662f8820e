"""The one optimisation loop of every training stage (pretraining stages, bridge stage 1 and 2).

    state = {"step": 0, "nan_streak": 0, ...}          # saved in every checkpoint's trainer.json
    run_steps(module, optimizer, LoopConfig(grad_accum=2, bf16=True), state=state, end=100,
              batch=lambda step, micro: {...},          # the micro-batch (on the device); a pure function of the step
              loss=lambda batch: {"loss": t, ...},      # scalar terms; "loss" is the one that is minimised
              set_lr=lambda step: lr,                   # sets the optimizer's learning rates, returns the logged one
              log=lambda step, lr, terms: ...,          # after every optimizer step (the caller picks what to write)
              save=lambda: ...)                         # every ckpt_every steps and at `end`

Per step: gradient accumulation over `grad_accum` micro-batches (DDP all-reduce / FSDP2 reduce-scatter on the last
one only), bf16 autocast on the device the module is on, a NaN/inf guard agreed by every rank (the step is skipped;
after `nan_patience` such steps in a row the run stops with a NonFiniteLoss error), and gradient clipping to a global
norm of `max_grad_norm` (0: off) before the optimizer steps: the norm of the whole model's gradient, over every
rank's shard when FSDP2 shards it (`clip_grad_norm_` on DTensor gradients reduces the shards' norms over the ranks).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ov2.distributed import any_rank


class NonFiniteLoss(RuntimeError):
    """The loss was not finite for `nan_patience` steps in a row."""


@dataclass
class LoopConfig:
    grad_accum: int = 1
    bf16: bool = False
    nan_patience: int = 5
    ckpt_every: int = 100
    max_grad_norm: float = 0.0  # clip the gradient's global norm to this before each optimizer step; 0: off


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of every training stage: linear warm-up over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _gradient_sync(module, last: bool):
    """DDP: gradients are all-reduced on the last micro-batch only (`no_sync` before it). FSDP2 is told per
    micro-batch instead (`set_requires_gradient_sync`): one reduce-scatter per optimizer step."""
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def run_steps(module, optimizer, cfg: LoopConfig, *, state: dict, end: int,
              batch: Callable[[int, int], dict], loss: Callable[[dict], dict[str, torch.Tensor]],
              set_lr: Callable[[int], float], log: Callable[[int, float, dict], None],
              save: Callable[[], None], bar=None, device: torch.device | None = None,
              before_step: Callable[[], None] | None = None) -> None:
    """Optimizer steps from state["step"] to `end` (state is updated in place)."""
    device = device or device_of(module)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    while state["step"] < end:
        lr = set_lr(state["step"])
        terms_sum: dict[str, torch.Tensor | float] = {}
        for micro in range(cfg.grad_accum):
            inputs = batch(state["step"], micro)
            last = micro == cfg.grad_accum - 1
            if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: its backward hooks read the flag
                module.set_requires_gradient_sync(last)
            with _gradient_sync(module, last), autocast:
                terms = loss(inputs)
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():  # on the device: no host sync per micro-step
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        terms_sum = {k: float(v) for k, v in terms_sum.items()}  # one sync per optimizer step
        if before_step is not None:  # e.g. averaging gradients over ranks for a model that DDP does not wrap
            before_step()
        if any_rank(not math.isfinite(terms_sum["loss"])):  # skip the step on every rank
            optimizer.zero_grad(set_to_none=True)
            state["nan_streak"] = state.get("nan_streak", 0) + 1
            if state["nan_streak"] >= cfg.nan_patience:
                raise NonFiniteLoss(f"loss was not finite for {state['nan_streak']} steps in a row at step "
                                    f"{state['step']}: lower the learning rate or check the data")
        else:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["nan_streak"] = 0
        state["step"] += 1
        if bar is not None:
            bar.update(1)
        log(state["step"], lr, terms_sum)
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == end:
            save()
