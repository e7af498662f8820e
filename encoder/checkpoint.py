"""Checkpoints: one folder per step, written atomically, the last K kept.

    RUN/config.yaml
    RUN/checkpoints/step_0000100/
        config.yaml          the training config (a checkpoint folder is self-contained)
        model.safetensors    full model weights (fp32)
        optimizer.pt         optimizer state (tensors and numbers only; loaded with weights_only=True)
        trainer.json         step, data position, stage, counters
        rng_rank{R}.pt       each process's torch RNG state (token dropping draws from it)

A folder is first written as `step_N.tmp` and renamed when complete, so a crash never leaves a
half-written checkpoint where `latest` looks. Works for plain, DDP and FSDP2 models (full state dicts).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from encoder import distributed as dist
from encoder.config import TrainConfig, from_dict, to_dict

_STEP = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def load_config(path: str) -> TrainConfig:
    with open(path) as f:
        return from_dict(yaml.safe_load(f))


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP.match(name)))
    return [os.path.join(root, name) for _, name in names]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> str:
    """Collective under torchrun: every rank calls it; rank 0 writes the shared files."""
    final = os.path.join(run_dir, "checkpoints", f"step_{state['step']:07d}")
    tmp = final + ".tmp"
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(torch.get_rng_state(), os.path.join(tmp, f"rng_rank{dist.rank()}.pt"))
    dist.barrier()
    if dist.is_main():
        save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "model.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(state, f, indent=1)
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model: nn.Module) -> dict:
    """Restore the model weights and this rank's RNG in place; return the trainer state."""
    set_model_state_dict(model, load_file(os.path.join(path, "model.safetensors")), options=_FULL)
    rng_file = os.path.join(path, f"rng_rank{dist.rank()}.pt")
    if os.path.exists(rng_file):
        torch.set_rng_state(torch.load(rng_file, weights_only=True))
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def load_optimizer(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optim_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state, options=_FULL)


def resolve(path: str) -> str:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path!r} (expected model.safetensors or checkpoints/step_*/)")
    return found


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """(model in eval mode, config) from a run folder or checkpoint folder; the encoder is `model.vit`."""
    from encoder.models import build_model

    ckpt = resolve(path)
    cfg = load_config(os.path.join(ckpt, "config.yaml"))
    model = build_model(cfg.model)
    state = {k.removeprefix("model."): v for k, v in load_file(os.path.join(ckpt, "model.safetensors")).items()
             if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), cfg
