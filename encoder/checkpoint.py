"""Pretraining checkpoints on the one scheme of `ov2.checkpoint` (atomic `step_N/`, verified on load).

    RUN/config.yaml
    RUN/checkpoints/step_0000100/
        config.yaml          the training config (a checkpoint folder is self-contained)
        model.safetensors    full model weights (fp32)                 } one process; under torchrun instead:
        optimizer.pt         optimizer state (tensors and numbers only) } sharded/ (torch.distributed.checkpoint:
                             each rank writes its part; a resume on another number of processes re-shards)
        trainer.json         step, data position, stage, counters, file sizes
        rng_rank{R}.pt       each process's torch RNG state (token dropping draws from it)

Saving and reading are `ov2.checkpoint.save` / `read` (the bridge stages use them too); this module only says what
the weights and optimizer state are: full state dicts for one process, the ranks' own parts (sharded for FSDP2)
under torchrun. Readers (`load_model`, export, evaluation) gather a sharded checkpoint in one process. A damaged
newest checkpoint (a cut file) is reported and the newest intact one is used instead, by `--resume`, `caption`,
`eval-encoder` and `export-encoder` alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from encoder.config import ConfigError, TrainConfig, from_dict, to_dict
from ov2 import checkpoint as core

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def load_config(path: str) -> TrainConfig:
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} does not hold a training config")
    return from_dict(tree)


def list_checkpoints(run_dir: str) -> list[str]:
    return [str(p) for p in core.list_checkpoints(run_dir)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded `model` (its parameters are DTensors), on several processes or on one."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_checkpoint(run_dir: str, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, local: dict | None = None) -> str:
    """Collective under torchrun (every rank calls it): the full state dicts, gathered from every rank, saved by the
    one checkpoint scheme of `ov2.checkpoint`; `local` is what each rank keeps of its own (a shard stream's
    cursors). A sharded model is saved in parts (nothing is gathered), also on one process."""
    from ov2 import distributed as dist

    if dist.world_size() > 1 or is_sharded(model):  # each rank writes its own part (torch.distributed.checkpoint)
        sharded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        return str(core.save(run_dir, state["step"], weights={}, optimizer={}, config=to_dict(cfg), state=state,
                             keep_last=cfg.keep_last, local=local, sharded=sharded))
    weights = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    return str(core.save(run_dir, state["step"], weights=weights, optimizer=optim_state, config=to_dict(cfg),
                         state=state, keep_last=cfg.keep_last, local=local))


def restore(bundle: dict, model: nn.Module) -> dict:
    """Put a read checkpoint's (`ov2.checkpoint.read`) weights and RNG state in place; return the trainer state.
    A sharded checkpoint is loaded by every rank into its own shards, re-sharded when the number of processes
    differs from the one that wrote it (torch.distributed.checkpoint reads whichever parts a shard needs)."""
    if bundle.get("sharded"):
        state = {"model": get_model_state_dict(model)}
        core.load_parts(state, bundle["sharded"])
        set_model_state_dict(model, state["model"])
    else:
        set_model_state_dict(model, bundle["weights"], options=_FULL)
    core.restore_rng(bundle)
    return dict(bundle["state"])


def restore_optimizer(bundle: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if bundle.get("sharded"):
        state = {"optim": get_optimizer_state_dict(model, optimizer)}
        core.load_parts(state, bundle["sharded"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        return
    set_optimizer_state_dict(model, optimizer, bundle["optimizer"], options=_FULL)


def _read_weights(path: Path) -> tuple[dict, TrainConfig]:
    return core.read_weights(path), load_config(str(path / "config.yaml"))


def resolve(path: str) -> str:
    """A run folder (its newest intact checkpoint) or a checkpoint folder -> the checkpoint folder."""
    return str(_resolve(path)[0])


def _resolve(path: str) -> tuple[Path, tuple[dict, TrainConfig]]:
    folder = Path(path)
    if (folder / core.WEIGHTS).is_file() or (folder / core.SHARDED).is_dir():
        return folder, _read_weights(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        found = core.newest(folder, _read_weights)
    except core.CheckpointError as err:
        raise FileNotFoundError(str(err)) from None
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path!r} (expected model.safetensors or checkpoints/step_*/)")
    return found


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """(model in eval mode, config) from a run folder or checkpoint folder; the encoder is `model.vit`."""
    from encoder.models import build_model

    _, (weights, cfg) = _resolve(path)
    model = build_model(cfg.model)
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def remove_tmp(run_dir: str) -> None:
    """Temporary folders a crash left behind (never a completed checkpoint)."""
    root = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
