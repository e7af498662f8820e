"""Every collective of pretraining and the bridge takes tensors on the device the process group serves
(`ov2.distributed.comm_device()`). NCCL serves CUDA tensors only; a CPU tensor fails with "No backend type associated
with device type cpu", which the gloo tests (CPU tensors, CPU group) can never show.

This machine has no GPU, so the tests play the NCCL case on the CPU:
- the GPU is `Elsewhere`: tensors that report device `meta` (a device type that a CPU build knows, autograd
  included; autocast is off there) while their values live in CPU memory. A dispatch mode runs every op on the
  values and marks the results `Elsewhere` again, so models train for real; as on CUDA, an op that mixes such
  tensors with CPU tensors (other than a copy or a 0-dim scalar) fails;
- the process group is `TwoRanks`: torch.distributed as rank 0 of two ranks that hold the same values, whose
  collectives accept only tensors on the group's device, as NCCL does; `comm_device()` names that device.
Then a few steps of the real loop (`ov2.loop.run_steps`) with each family's losses (contrastive features gathered
with gradients), and of a bridge stage's loop (its token-weighted loss), must pass every tensor to the collectives on
the group's device. DDP's and FSDP's own collectives (the gradients' averaging) are torch's, not simulated here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ov2 import distributed as dist
from ov2.config import ConfigError
from ov2.loop import LoopConfig, run_steps

ELSEWHERE = torch.device("meta")
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class Elsewhere(torch.Tensor):
    """A tensor on ELSEWHERE whose values are the CPU tensor `inner`."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=ELSEWHERE, requires_grad=inner.requires_grad)
        t.inner = inner
        return t

    def __repr__(self) -> str:
        return f"Elsewhere({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an Elsewhere tensor outside on_elsewhere()")


class _Ops(TorchDispatchMode):
    """Runs every op on the values: a result is Elsewhere when an input was, or when the op was asked for ELSEWHERE."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        wrappers, kinds = {}, set()

        def unwrap(x):
            if isinstance(x, Elsewhere):
                wrappers[id(x.inner)] = x
                kinds.add("elsewhere")
                return x.inner
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                kinds.add("cpu")
            if isinstance(x, torch.device) and x.type == ELSEWHERE.type:
                kinds.add("elsewhere")
                return torch.device("cpu")
            return x

        args, kwargs = tree_map(unwrap, (args, kwargs or {}))
        if kinds == {"cpu", "elsewhere"} and func not in COPIES:
            raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                               f"devices, {ELSEWHERE} and cpu!")
        out = func(*args, **kwargs)
        if "elsewhere" not in kinds:
            return out
        return tree_map(lambda t: (wrappers[id(t)] if id(t) in wrappers else Elsewhere(t))
                        if isinstance(t, torch.Tensor) else t, out)


class _NewTensors(TorchFunctionMode):
    """torch.tensor(data, device=ELSEWHERE) copies its data to the device out of the dispatch mode's sight: make it
    on the CPU, then move it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu") == ELSEWHERE:
            return func(*args, **{**kwargs, "device": "cpu"}).to(ELSEWHERE)
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_elsewhere():
    """Within: ELSEWHERE is a device whose tensors compute (see the module docstring)."""
    with _Ops(), _NewTensors():
        yield


class TwoRanks:
    """torch.distributed seen from rank 0 of 2 whose other rank holds the same values; collectives take tensors
    on `device` only (as NCCL takes CUDA tensors only) and are recorded in `calls`."""

    UNSIMULATED = ("broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                   "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
                   "broadcast_object_list", "gather_object", "scatter_object_list", "all_reduce_coalesced")

    def __init__(self, device: torch.device):
        self.device, self.calls = device, []

    def _check(self, name: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != self.device.type:
                raise RuntimeError(f"{name}: No backend type associated with device type {t.device.type}")
        self.calls.append(name)

    def all_reduce(self, tensor, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
        self._check("all_reduce", tensor)
        if op == torch_dist.ReduceOp.SUM:
            tensor.mul_(2)
        elif op not in (torch_dist.ReduceOp.MAX, torch_dist.ReduceOp.MIN):
            raise NotImplementedError(f"all_reduce {op} is not simulated")

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        self._check("all_gather", tensor, *tensor_list)
        for out in tensor_list:
            out.copy_(tensor)

    def barrier(self, group=None, async_op=False, device_ids=None, timeout=None):
        self._check("barrier")

    def install(self, monkeypatch) -> None:
        for name, fn in {"is_initialized": lambda: True, "get_world_size": lambda group=None: 2,
                         "get_rank": lambda group=None: 0, "all_reduce": self.all_reduce,
                         "all_gather": self.all_gather, "barrier": self.barrier}.items():
            monkeypatch.setattr(torch_dist, name, fn)
        for name in self.UNSIMULATED:
            monkeypatch.setattr(torch_dist, name, _unsimulated(name), raising=False)
        monkeypatch.setattr(dist, "comm_device", lambda: self.device, raising=False)


def _unsimulated(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"torch.distributed.{name} is not simulated by TwoRanks: add it")
    return fail


@pytest.fixture
def world(monkeypatch):
    """Two ranks on the ELSEWHERE device for the duration of a test."""
    group = TwoRanks(ELSEWHERE)
    group.install(monkeypatch)
    # autocast knows no meta device: it is off there
    is_autocast_enabled, autocast = torch.is_autocast_enabled, torch.autocast
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *device: device[:1] != (ELSEWHERE.type,) and is_autocast_enabled(*device))
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: contextlib.nullcontext()
                        if device_type == ELSEWHERE.type else autocast(device_type, *args, **kwargs))
    return group


def test_the_simulation_fails_like_nccl_on_a_cpu_tensor(world):
    with on_elsewhere():
        on_device = torch.ones(2, device=ELSEWHERE)
        torch_dist.all_reduce(on_device)
        assert isinstance(on_device, Elsewhere) and on_device.inner.tolist() == [2.0, 2.0]
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            torch_dist.all_reduce(torch.ones(2))
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            on_device + torch.ones(2)


def _pretrain_batches(family: str, steps: int):
    from encoder.config import get_preset
    from encoder.data.loader import make_loader
    from encoder.data.sources import open_source
    from encoder.models import text_inputs
    from encoder.train import _model_inputs

    cfg = get_preset(f"{family}-micro")
    cfg = replace(cfg, data=replace(cfg.data, workers=0))
    stage = cfg.stages[0]
    loader = iter(make_loader(open_source(cfg.data, render_size=stage.image_size), cfg.data, stage.image_size, 4,
                              cfg.seed, 0, text_inputs(cfg.model)))
    return cfg, [{k: v for k, v in _model_inputs(next(loader), torch.device("cpu")).items() if torch.is_tensor(v)}
                 for _ in range(steps)]  # pixels normalised, as the trainer does


@pytest.mark.parametrize("family", ["ov2", "ov1", "clip"])
def test_pretraining_steps_give_the_collectives_tensors_on_the_groups_device(world, family):
    from encoder.models import build_losses, build_model
    from encoder.train import TrainModule

    cfg, batches = _pretrain_batches(family, steps=2)
    torch.manual_seed(0)
    module = TrainModule(build_model(cfg.model), build_losses(cfg))
    logged = []
    with on_elsewhere():
        module.to(ELSEWHERE)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        state = {"step": 0, "nan_streak": 0}
        run_steps(module, optimizer, LoopConfig(grad_accum=2, ckpt_every=100), state=state, end=2,
                  batch=lambda step, micro: {k: v.to(ELSEWHERE) for k, v in batches[step].items()},
                  loss=module, set_lr=lambda step: 1e-3, log=lambda step, lr, terms: logged.append(terms["loss"]),
                  save=lambda: None)
    assert state == {"step": 2, "nan_streak": 0} and all(torch.isfinite(torch.tensor(logged)))
    assert isinstance(next(module.parameters()), Elsewhere)  # the model really ran on the group's device
    assert world.calls.count("all_reduce") >= 2  # the loop's non-finite guard, once a step
    if family != "ov2":  # contrastive features are gathered (rows, then their counts' and features' gathers)
        assert "all_gather" in world.calls


@pytest.mark.parametrize("model_on", ["group device", "cpu"])
def test_bridge_stage_steps_give_the_collectives_tensors_on_the_groups_device(world, model_on, tmp_path,
                                                                              monkeypatch):
    """The bridge's loss weights each rank by its answer tokens (all_reduce); a model left on the CPU (`--device=cpu`)
    under an NCCL group still hands the collectives tensors on the group's device. The loop calls the model as the
    engine's root module (bridge.engine.Answering), here without DDP, whose collectives are torch's."""
    from bridge_helpers import smollm2_tokenizer, write_our_checkpoint

    from bridge import train as bridge_train
    from bridge.assemble import assemble
    from bridge.config import LlavaStageConfig
    from bridge.data import Collator, SynthCaptions
    from bridge.engine import Answering
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_our_checkpoint(tmp_path / "ckpt")
    tokenizer = smollm2_tokenizer()
    tower = load_tower(tmp_path / "ckpt")
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=0, init_std=0.1), tokenizer, seed=0)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    monkeypatch.setattr(bridge_train.core, "save", lambda *args, **kwargs: None)  # no safetensors of Elsewhere
    cfg = LlavaStageConfig(stage=1, steps=4, batch_size=4, lr=1e-3, progress=False, ckpt_every=100)
    (tmp_path / "stage1").mkdir()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with on_elsewhere():
        if model_on != "cpu":
            model.to(ELSEWHERE)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
        state = {"step": 0, "nan_streak": 0, "elapsed": 0.0}
        summary = bridge_train._loop(model, Answering(model), SynthCaptions(8, image_size=32), collate, cfg,
                                     tmp_path / "stage1", opt, state, stop_after=2, bf16=False)
    assert summary["steps"] == state["step"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    after = [p.inner if isinstance(p, Elsewhere) else p for p in trainable]
    assert isinstance(trainable[0], Elsewhere) == (model_on != "cpu")
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, after))  # the steps were taken
    assert world.calls.count("all_reduce") >= 2 * 2  # per step: the answer tokens, the non-finite guard


def test_comm_device_barrier_and_setup_under_nccl(monkeypatch):
    """Under nccl: the group is bound to cuda:LOCAL_RANK at setup (torch's advice for barrier()), collectives use
    that device and barrier() names it. Played with the CUDA calls replaced: this machine has no GPU."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: any(call[0] == "init" for call in calls))
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *args, **kwargs: calls.append(("init", args, kwargs)))
    monkeypatch.setattr(torch_dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch_dist, "barrier", lambda **kwargs: calls.append(("barrier", kwargs)))
    gpu = torch.device("cuda", 1)
    assert dist.setup() == gpu and dist.comm_device() == gpu
    dist.barrier()
    # collectives wait 60 minutes, not NCCL's 10: rank 0 may write a 7B model's final weights while the others wait
    hour = datetime.timedelta(minutes=60)
    assert calls == [("set_device", gpu), ("init", ("nccl",), {"device_id": gpu, "timeout": hour}),
                     ("barrier", {"device_ids": [1]})]


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("OV2_DIST_TIMEOUT_MIN", "90")
    assert dist.timeout() == datetime.timedelta(minutes=90)
    for bad in ("0", "-5", "an hour", "nan"):
        monkeypatch.setenv("OV2_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ConfigError, match="OV2_DIST_TIMEOUT_MIN must be a positive number of minutes"):
            dist.timeout()


def test_ddp_looks_for_unused_parameters_in_the_bridge_only(tmp_path, monkeypatch):
    """Pretraining uses every parameter in every step, so its DDP skips the per-step search for unused ones (a graph
    walk and a warning); the bridge's keeps it (a text-only batch leaves the projector out). DDP on a one-process
    gloo group, with wrap told that there are two."""
    from bridge import engine

    llava = nn.Module()  # what engine.wrap reads of a LLaVA model: its LLM's decoder layers
    llava.model = nn.Module()
    llava.model.language_model = nn.Module()
    llava.model.language_model.layers = nn.ModuleList([nn.Linear(4, 4)])
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        pretraining = dist.wrap(nn.Linear(4, 4), "ddp", torch.device("cpu"))
        bridge = engine.wrap(llava, sharded=False, bf16=False, device=torch.device("cpu"))
        assert isinstance(pretraining, nn.parallel.DistributedDataParallel) and not pretraining.find_unused_parameters
        assert isinstance(bridge, nn.parallel.DistributedDataParallel) and bridge.find_unused_parameters
    finally:
        torch_dist.destroy_process_group()


def test_helpers_on_a_one_process_gloo_group(tmp_path):
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.comm_device() == torch.device("cpu")
        assert dist.any_rank(True) and not dist.any_rank(False)
        t = torch.arange(3.0)
        assert dist.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
        dist.barrier()
    finally:
        torch_dist.destroy_process_group()
    assert dist.comm_device() == torch.device("cpu") and dist.any_rank(True)  # no group: the one-process case

