"""Several processes (gloo, CPU): a contrastive step on 2 ranks equals one process on the global batch (DDP, FSDP2,
uneven shards), and the ov2.distributed reductions (any_rank, all_reduce_sum_) agree across ranks; 2-process
`torchrun` training of each preset family, then an exact resume from a checkpoint. (That every collective gets
tensors on the group's device, as NCCL needs, is tests/test_collectives.py.)

This file is also the worker script: `torchrun --standalone --nproc_per_node=2 tests/test_distributed.py OUT`.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from encoder.checkpoint import latest_checkpoint, list_checkpoints  # noqa: E402
from encoder.config import get_preset  # noqa: E402
from encoder.models import build_losses, build_model  # noqa: E402
from encoder.tokenizer import get_tokenizer  # noqa: E402
from encoder.train import TrainModule  # noqa: E402
from tests.helpers import assert_close_scaled, records  # noqa: E402

GLOBAL_BATCH = 8
CAPTIONS = [f"a {size} {colour} circle at the top" for size in ("small", "large") for colour in
            ("red", "blue", "green", "pink")]


def _module(family: str = "clip") -> TrainModule:
    cfg = get_preset(f"{family}-micro")
    torch.manual_seed(0)
    return TrainModule(build_model(cfg.model), build_losses(cfg))


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    context = get_preset("clip-micro").model.text.context
    return {"pixels": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g),
            "text_tokens": get_tokenizer()(CAPTIONS, context, pad_to_max=True)}


def _step(module: torch.nn.Module, batch: dict) -> float:
    terms = module(batch)
    terms["loss"].backward()
    return float(terms["loss"].detach())


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def worker(out: str) -> None:
    """Each rank takes its rows of the global batch; rank 0 saves loss and full gradients per mode."""
    from ov2 import distributed as dist

    device = dist.setup()
    rank, world = dist.rank(), dist.world_size()
    batch = _global_batch()
    results = {}
    for mode, cuts in (("ddp", None), ("fsdp", None), ("ddp_uneven", [0, 5, 8])):
        cuts = cuts or [GLOBAL_BATCH * r // world for r in range(world + 1)]
        lo, hi = cuts[rank], cuts[rank + 1]
        local = {k: v[lo:hi] for k, v in batch.items()}
        module = _module()
        wrapped = dist.wrap(module, mode.split("_")[0], device)
        loss = _step(wrapped, local)
        grads = _grads(module)
        if rank == 0:
            results[mode] = {"loss": torch.tensor(loss), **{f"grad.{k}": v for k, v in grads.items()}}
    flags = torch.tensor([dist.any_rank(rank == 1), dist.any_rank(False)])  # the loop's NaN guard, the bridge's sum
    summed = dist.all_reduce_sum_(torch.tensor([float(rank + 1)]))
    if rank == 0:
        results["helpers"] = {"flags": flags, "summed": summed}
        torch.save(results, out)
    dist.teardown()


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow  # a 2-process torchrun
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "dist.pt")
    result = torchrun(os.path.abspath(__file__), out)
    assert result.returncode == 0, result.stderr[-3000:]
    module = _module()
    ref_loss = _step(module, _global_batch())
    ref = _grads(module)
    assert "losses.0.log_scale" in ref and "model.text.head.weight" in ref and "model.image_head.weight" in ref
    results = torch.load(out, weights_only=True)
    helpers = results.pop("helpers")
    assert helpers["flags"].tolist() == [True, False] and helpers["summed"].tolist() == [3.0]
    assert sorted(results) == ["ddp", "ddp_uneven", "fsdp"]
    for mode, got in results.items():
        assert_close_scaled(got["loss"], torch.tensor(ref_loss), msg=f"{mode}: loss")
        grads = {k.removeprefix("grad."): v for k, v in got.items() if k.startswith("grad.")}
        assert grads.keys() == ref.keys(), mode
        for name, g in ref.items():
            assert g.abs().max() > 0, name  # every parameter takes part, so a missing all-reduce shows
            assert_close_scaled(grads[name], g, msg=f"{mode}: {name}")


RUN = ["--stages.0.image_size=16", "--stages.1.image_size=32", "--stages.0.batch_size=4",
       "--stages.1.batch_size=4", "--stages.0.steps=4", "--stages.1.steps=4", "--stages.0.warmup_steps=1",
       "--stages.1.warmup_steps=1", "--ckpt_every=2", "--log_every=2", "--keep_last=4", "--data.workers=0"]


@pytest.mark.slow  # four 2-process trainings (~1 min together on 2 cores)
@pytest.mark.parametrize("family,mode", [("ov2", "ddp"), ("ov1", "fsdp"), ("clip", "ddp"), ("clip", "fsdp")])
def test_torchrun_training_checkpoint_and_exact_resume(tmp_path, family, mode):
    from safetensors.torch import load_file

    full = str(tmp_path / "full")
    result = torchrun("-m", "encoder", "train", "--preset", f"{family}-micro", "--out", full, *RUN,
                      f"--distributed={mode}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(p[-7:]) for p in list_checkpoints(full)] == [2, 4, 6, 8]
    logged = records(full)
    assert [r["step"] for r in logged] == [2, 4, 6, 8]  # rank 0 logs, once
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert sorted(os.listdir(latest_checkpoint(full))) == sorted(
        ["config.yaml", "model.safetensors", "optimizer.pt", "trainer.json", "rng_rank0.pt", "rng_rank1.pt"])

    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step_0000008"))  # stop inside stage 2, at step 6
    result = torchrun("-m", "encoder", "train", "--out", resumed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(os.path.join(full, "checkpoints", "step_0000008", "model.safetensors"))
    b = load_file(os.path.join(resumed, "checkpoints", "step_0000008", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert_close_scaled(b[k], a[k], rel=1e-5, msg=k)
    assert [r["step"] for r in records(resumed)] == [2, 4, 6, 8]


if __name__ == "__main__":
    worker(sys.argv[1])
