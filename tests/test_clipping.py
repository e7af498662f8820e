"""Gradient clipping in the one training loop (`LoopConfig.max_grad_norm`): the update's norm is bounded, and under
FSDP2 (each rank holding a shard of every gradient) the norm clipped is the whole model's, so 2 ranks clip exactly
as one process does on the global batch (DDP too).

This file is also the worker script: `torchrun --standalone --nproc_per_node=2 tests/test_clipping.py OUT`.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ov2.loop import LoopConfig, run_steps  # noqa: E402
from tests.helpers import assert_close_scaled  # noqa: E402
from tests.test_distributed import GLOBAL_BATCH, _global_batch, _grads, _module, torchrun  # noqa: E402

MAX_NORM = 0.05  # far below the micro CLIP model's gradient norm at initialisation (checked below)


def _clipped_step(module, wrapped, batches: list[dict], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """One optimizer step of the loop over the micro-batches `batches`: the full gradients the optimizer steps with."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(_grads(module)))
    run_steps(wrapped, optimizer, LoopConfig(grad_accum=len(batches), max_grad_norm=max_grad_norm),
              state={"step": 0}, end=1, batch=lambda step, micro: batches[micro], loss=wrapped,
              set_lr=lambda step: 0.0, log=lambda *a: None, save=lambda: None)
    return grads


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])))


def test_clipping_bounds_the_update():
    """A step's gradient of norm above max_grad_norm is scaled down to that norm (direction kept, over every parameter
    together, after the micro-batches are summed); below it, or with 0 (off), it is left as it is."""
    raw = _clipped_step(*(2 * [_module()]), [_global_batch()], 0.0)
    assert _norm(raw) > 10 * MAX_NORM
    module = _module()
    clipped = _clipped_step(module, module, [_global_batch()], MAX_NORM)
    assert _norm(clipped) == pytest.approx(MAX_NORM, rel=1e-4)
    for name, g in raw.items():
        assert_close_scaled(clipped[name], g * MAX_NORM / _norm(raw), msg=name)
    module = _module()
    batch, half = _global_batch(), GLOBAL_BATCH // 2
    accumulated = _clipped_step(module, module, [{k: v[:half] for k, v in batch.items()},
                                                 {k: v[half:] for k, v in batch.items()}], MAX_NORM)
    assert _norm(accumulated) <= MAX_NORM * (1 + 1e-4)
    module = _module()
    above = _clipped_step(module, module, [_global_batch()], 2 * _norm(raw))
    for name, g in raw.items():
        assert torch.equal(above[name], g), name


def test_max_grad_norm_keys_follow_the_recipes_and_are_part_of_them(tmp_path):
    """Pretraining: off, as the paper (no gradient clipping); the bridge's stages: 1.0, as LLaVA. The key is part of
    the recipe: a resume may not change it; a run saved before the key existed resumes as it was trained (off)."""
    from dataclasses import asdict

    from bridge.config import RESUME_SAFE as BRIDGE_SAFE
    from bridge.config import BridgeConfig, LlavaStageConfig, upgrade
    from encoder.config import ARCHITECTURE, RESUME_SAFE, from_dict, get_preset, to_dict
    from encoder.config import upgrade as encoder_upgrade
    from ov2.config import ConfigError
    from ov2.resume import check_resume

    assert get_preset("ov2-l14").max_grad_norm == 0.0 and get_preset("ov2-micro").max_grad_norm == 0.0
    bridge = BridgeConfig(encoder="preset:ov2-micro", out=str(tmp_path))
    assert bridge.stage1.max_grad_norm == bridge.stage2.max_grad_norm == 1.0
    old = to_dict(get_preset("ov2-micro"))
    del old["max_grad_norm"]
    check_resume(tmp_path, from_dict(old), 0, encoder_upgrade(old), safe=RESUME_SAFE, architecture=ARCHITECTURE)
    clipped = from_dict({**old, "max_grad_norm": 1.0})
    with pytest.raises(ConfigError, match="cannot change the recipe: max_grad_norm"):
        check_resume(tmp_path, clipped, 0, encoder_upgrade(old), safe=RESUME_SAFE, architecture=ARCHITECTURE)
    old_run = asdict(bridge)
    for stage in ("stage1", "stage2"):
        del old_run[stage]["max_grad_norm"]
    resumed = BridgeConfig.from_dict(old_run)
    assert resumed.stage1.max_grad_norm == resumed.stage2.max_grad_norm == 0.0
    check_resume(tmp_path, resumed.stage2, 0, upgrade(old_run["stage2"]), safe=BRIDGE_SAFE)
    with pytest.raises(ConfigError, match="cannot change the recipe: max_grad_norm"):
        check_resume(tmp_path, LlavaStageConfig(stage=2), 0, upgrade(old_run["stage2"]), safe=BRIDGE_SAFE)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="max_grad_norm must be 0 \\(off\\) or a positive norm"):
            LlavaStageConfig(stage=2, max_grad_norm=bad)


def worker(out: str) -> None:
    """Each rank its half of the global batch, DDP then FSDP2, clipped in the loop; rank 0 saves the full gradients the
    optimizer stepped with."""
    from ov2 import distributed as dist

    device = dist.setup()
    rank, world = dist.rank(), dist.world_size()
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    local = {k: v[lo:hi] for k, v in _global_batch().items()}
    results = {}
    for mode in ("ddp", "fsdp"):
        module = _module()
        results[mode] = _clipped_step(module, dist.wrap(module, mode, device), [local], MAX_NORM)
    if rank == 0:
        torch.save(results, out)
    dist.teardown()


@pytest.mark.slow  # a 2-process torchrun
def test_two_ranks_clip_the_global_norm_as_one_process(tmp_path):
    out = str(tmp_path / "clipped.pt")
    result = torchrun(os.path.abspath(__file__), out)
    assert result.returncode == 0, result.stderr[-3000:]
    raw = _clipped_step(*(2 * [_module()]), [_global_batch()], 0.0)
    scale = MAX_NORM / _norm(raw)
    assert scale < 0.1  # clipping is at work
    results = torch.load(out, weights_only=True)
    for mode, got in results.items():
        assert got.keys() == raw.keys(), mode
        for name, g in raw.items():  # a norm of each rank's shard alone would scale each shard differently
            assert_close_scaled(got[name], g * scale, msg=f"{mode}: {name}")


if __name__ == "__main__":
    worker(sys.argv[1])
