"""How a bridge stage trains on several processes: the engine that shares the model and syncs its gradients.

    root = engine.wrap(model, sharded, bf16, device)   # the module the loop calls: root(batch) -> {"lm_loss", ...}

One process: the model under the answer loss, nothing more. Under torchrun (`ov2.distributed.wrap`):
    DDP (default)      every rank holds the model; gradients are all-reduced once per optimizer step
    stage2.fsdp        FSDP2 `fully_shard`, as LLaVA-1.5 trains a 7B LLM with DeepSpeed ZeRO-3: each decoder layer of
                       the LLM is a unit and the rest (embeddings, LM head, projector, tower) the root's; parameters,
                       gradients and AdamW state are split over the ranks; with bf16 on, compute in bf16 and reduce
                       in float32
Both average the gradients over the ranks, which the token-weighted loss (bridge.train) expects; the loss runs
inside the root's forward, so FSDP2 gathers the root's parameters (the tied embeddings and LM head among them) and
DDP hooks the backward around it.

A sharded stage's checkpoints are written by torch.distributed.checkpoint, each rank its part of the trainable
parameters and their optimizer state (`sharded_state`; a resume on another number of processes re-shards:
`load_sharded`); its weights are gathered once, for final.safetensors (`full_trainable`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from bridge.loss import AnswerLoss
from ov2 import checkpoint as core
from ov2 import distributed as dist


class Answering(nn.Module):
    """The LLaVA model under the answer loss, as one module: the engine wraps this."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.loss = model, AnswerLoss()

    def forward(self, batch: dict) -> dict:
        return self.loss(self.model, batch)


def decoder_layers(model) -> list[nn.Module]:
    """The LLM's decoder layers (Llama, Qwen2, Mistral ... all keep them in `layers`): FSDP2's units."""
    return list(model.model.language_model.layers)


def wrap(model, sharded: bool, bf16: bool, device: torch.device) -> nn.Module:
    """-> the module a stage's loop calls (see the module docstring); `model` keeps its parameter names."""
    layers = {id(m) for m in decoder_layers(model)}
    # DDP looks for unused parameters: a text-only batch leaves the projector out, and an unfrozen tower's layers
    # after the feature layer never take part
    return dist.wrap(Answering(model), "fsdp" if sharded else "ddp", device, bf16=bf16,
                     units=lambda m: id(m) in layers, find_unused=True)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters of a model that is not sharded, copied to the CPU."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def sharded_state(model, optimizer) -> dict:
    """What each rank writes of a sharded stage (ov2.checkpoint.save(sharded=...)): its part of the trainable
    parameters and of their optimizer state."""
    names = _trainable_names(model)
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    return {"model": weights, "optim": get_optimizer_state_dict(model, optimizer)}


def load_sharded(model, optimizer, folder: str) -> None:
    """A sharded checkpoint's parts into this rank's shards (any number of processes, one included)."""
    state = sharded_state(model, optimizer)
    core.load_parts(state, folder)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_trainable(model) -> dict[str, torch.Tensor]:
    """The trainable parameters whole, on the CPU of rank 0 (the other ranks get {}): a collective when sharded."""
    if not is_sharded(model):
        return trainable_state(model)
    names = _trainable_names(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in full.items() if k in names} if dist.is_main() else {}
