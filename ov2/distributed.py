"""Process-group helpers for `torchrun`: setup, rank queries, the collectives' device, model wrapping (DDP or
FSDP2), feature gather.

Single process runs need no launcher: every helper degrades to the one-process case.
gloo on CPU, nccl on CUDA. NCCL takes CUDA tensors only (a CPU tensor fails with "No backend type associated with
device type cpu"): a tensor made for a collective is made on `comm_device()`, and a tensor that lives elsewhere is
moved there for the collective.

A collective waits at most `OV2_DIST_TIMEOUT_MIN` minutes (default 60, torch's own is 10 for NCCL) for the other
ranks: long enough for rank 0 to write a 7B model's final weights alone while the others wait in a barrier.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ov2.config import ConfigError

TIMEOUT_MIN = 60  # minutes a collective waits for the other ranks (OV2_DIST_TIMEOUT_MIN overrides)


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: OV2_DIST_TIMEOUT_MIN minutes, 60 by default."""
    text = os.environ.get("OV2_DIST_TIMEOUT_MIN", str(TIMEOUT_MIN))
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"OV2_DIST_TIMEOUT_MIN must be a positive number of minutes, got {text!r}")
    return datetime.timedelta(minutes=minutes)


def setup() -> torch.device:
    """Join the process group when launched by torchrun; return this process's device (cuda:LOCAL_RANK on a GPU)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (and convolutions) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if device is not None:  # binding the device is what torch asks for: barrier() and NCCL's setup use it
            dist.init_process_group("nccl", device_id=device, timeout=timeout())
        else:
            dist.init_process_group("gloo", timeout=timeout())
    return device or torch.device("cpu")


def comm_device() -> torch.device:
    """The device of the tensors the process group's collectives take: cuda:LOCAL_RANK under nccl, cpu otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        device = comm_device()
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a collective): on comm_device(), so a tensor elsewhere goes there and back."""
    if not dist.is_initialized():
        return t
    on = t.to(comm_device())
    dist.all_reduce(on)
    if on is not t:
        t.copy_(on)
    return t


def is_block(module: nn.Module) -> bool:
    """Our ViT's and text tower's transformer blocks: FSDP2's units in pretraining."""
    return type(module).__name__ == "Block"


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: every transformer `Block` recomputes its activations in the backward pass (state
    dict names unchanged). Applied before `wrap`, which shards the same blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=is_block)


def wrap(model: nn.Module, mode: str, device: torch.device, bf16: bool = False, units=is_block,
         find_unused: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 `fully_shard` when running on several processes; the module itself otherwise.
    `find_unused`: DDP looks for parameters a step did not use (an extra walk of the graph every step); only a model
    whose steps may leave some trainable parameter out needs it (the bridge: a text-only batch skips the projector).
    FSDP2 shards every module that `units` picks (the transformer blocks) and the rest as the root's unit; with
    `bf16` it computes in bf16 (parameters cast for the forward and backward) and reduces gradients in float32,
    keeping float32 master weights. Either one averages the gradients over the ranks."""
    if world_size() == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for module in [m for m in model.modules() if units(m)]:
            fully_shard(module, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank computed the loss over the whole gathered batch: sum their gradients, keep our slice
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n: (dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank, on comm_device() (where setup() puts the model) -> [world x B, D] in rank order; gradients
    flow back to the local shard."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
