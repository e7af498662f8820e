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


def _stream_batch(shards: str, rank: int, world: int) -> dict:
    """The first batch rank `rank` of `world` streams from the shard set `shards` (its share of the global batch)."""
    from encoder.config import DataConfig
    from encoder.data.loader import make_loader
    from encoder.data.stream import StreamSource, shard_urls
    from encoder.models import text_inputs
    from encoder.train import _model_inputs

    source = StreamSource(shard_urls(shards)).split(rank, world)
    loader = make_loader(source, DataConfig(workers=0), 16, GLOBAL_BATCH // world, 0, None,
                         text_inputs(get_preset("clip-micro").model))
    return _model_inputs(next(iter(loader)), torch.device("cpu"))


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


def _fsdp_loop_step(module, wrapped, local: dict, accum: int) -> tuple[int, dict]:
    """One optimizer step of `ov2.loop.run_steps` over `accum` micro-batches of `local`: (reduce-scatters issued,
    the accumulated full gradients, taken before the optimizer steps)."""
    import torch.distributed as torch_dist

    from ov2.loop import LoopConfig, run_steps

    n = local["pixels"].shape[0] // accum
    micro = [{k: v[i * n:(i + 1) * n] for k, v in local.items()} for i in range(accum)]
    seen, grads, original = [], {}, torch_dist.reduce_scatter_single
    torch_dist.reduce_scatter_single = lambda *a, **k: seen.append(1) or original(*a, **k)
    try:
        run_steps(wrapped, torch.optim.SGD(module.parameters(), lr=0.0), LoopConfig(grad_accum=accum),
                  state={"step": 0}, end=1, batch=lambda step, m: micro[m], loss=wrapped, set_lr=lambda step: 0.0,
                  log=lambda *a: None, save=lambda: None, before_step=lambda: grads.update(_grads(module)))
    finally:
        torch_dist.reduce_scatter_single = original
    return len(seen), grads


def worker(out: str, shards: str) -> None:
    """Each rank takes its rows of the global batch (and, for "stream", its own shards of `shards`); rank 0 saves loss
    and full gradients per mode."""
    from ov2 import distributed as dist

    device = dist.setup()
    rank, world = dist.rank(), dist.world_size()
    batch = _global_batch()
    results = {}
    module = _module()
    loss = _step(dist.wrap(module, "ddp", device), _stream_batch(shards, rank, world))
    if rank == 0:
        results["stream"] = {"loss": torch.tensor(loss), **{f"grad.{k}": v for k, v in _grads(module).items()}}
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
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    for accum in (1, 2):  # FSDP2 through the loop: one reduce-scatter per optimizer step, however many micro-steps
        module = _module()
        reduce_scatters, grads = _fsdp_loop_step(module, dist.wrap(module, "fsdp", device),
                                                 {k: v[lo:hi] for k, v in batch.items()}, accum)
        if rank == 0:
            results[f"fsdp_accum{accum}"] = {"loss": torch.tensor(float("nan")),
                                             "reduce_scatters": torch.tensor(reduce_scatters),
                                             **{f"grad.{k}": v for k, v in grads.items()}}
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


def _shard_set(folder) -> str:
    """Four webdataset shards of built-in scenes, named by a brace pattern as a user names a large set."""
    from encoder.data.shards import write_synth_shards

    write_synth_shards(str(folder), 32, size=16, per_shard=8)
    return f"{folder}/shard-{{000000..000003}}.tar"


@pytest.mark.slow  # a 2-process torchrun
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    out, shards = str(tmp_path / "dist.pt"), _shard_set(tmp_path / "shards")
    result = torchrun(os.path.abspath(__file__), out, shards)
    assert result.returncode == 0, result.stderr[-3000:]
    module = _module()
    ref_loss = _step(module, _global_batch())
    ref = _grads(module)
    assert "losses.0.log_scale" in ref and "model.text.head.weight" in ref and "model.image_head.weight" in ref
    # streamed shards: the two ranks' batches (each from its own shards) are one process's global batch
    halves = [_stream_batch(shards, r, 2) for r in range(2)]
    assert not set(halves[0]["captions"]) & set(halves[1]["captions"])
    whole = {k: torch.cat([h[k] for h in halves]) if torch.is_tensor(halves[0][k]) else halves[0][k] + halves[1][k]
             for k in halves[0]}
    stream_module = _module()
    accumulated = _module()  # two micro-steps; each one's contrastive batch is both ranks' rows of that micro-step
    for m in range(2):
        rows = torch.tensor([m * 2, m * 2 + 1, 4 + m * 2, 5 + m * 2])
        (accumulated({k: v[rows] for k, v in _global_batch().items()})["loss"] / 2).backward()
    refs = {"fsdp_accum2": (float("nan"), _grads(accumulated))}
    refs["stream"] = (_step(stream_module, whole), _grads(stream_module))
    results = torch.load(out, weights_only=True)
    helpers = results.pop("helpers")
    assert helpers["flags"].tolist() == [True, False] and helpers["summed"].tolist() == [3.0]
    assert sorted(results) == ["ddp", "ddp_uneven", "fsdp", "fsdp_accum1", "fsdp_accum2", "stream"]
    once, twice = (int(results[f"fsdp_accum{a}"].pop("reduce_scatters")) for a in (1, 2))
    assert once > 0 and twice == once  # gradient accumulation does not reduce-scatter on every micro-step
    for mode, got in results.items():
        want_loss, want = refs.get(mode, (ref_loss, ref))
        if not got["loss"].isnan():  # the loop's steps log no loss here
            assert_close_scaled(got["loss"], torch.tensor(want_loss), msg=f"{mode}: loss")
        grads = {k.removeprefix("grad."): v for k, v in got.items() if k.startswith("grad.")}
        assert grads.keys() == want.keys(), mode
        for name, g in want.items():
            assert g.abs().max() > 0, name  # every parameter takes part, so a missing all-reduce shows
            assert_close_scaled(grads[name], g, msg=f"{mode}: {name}")


RUN = ["--stages.0.image_size=16", "--stages.1.image_size=32", "--stages.0.batch_size=4",
       "--stages.1.batch_size=4", "--stages.0.steps=4", "--stages.1.steps=4", "--stages.0.warmup_steps=1",
       "--stages.1.warmup_steps=1", "--ckpt_every=2", "--log_every=2", "--keep_last=4", "--data.workers=0"]


@pytest.mark.slow  # four 2-process trainings (~1 min together on 2 cores)
@pytest.mark.parametrize("family,mode,data", [("ov2", "ddp", "synth"), ("ov1", "fsdp", "synth"),
                                              ("clip", "ddp", "shards"), ("clip", "fsdp", "synth")])
def test_torchrun_training_checkpoint_and_exact_resume(tmp_path, family, mode, data):
    """Checkpoints are sharded (torch.distributed.checkpoint: each rank writes its part). Shards: a brace pattern
    streamed by 2 workers per rank; each rank's cursors go into its own checkpoint file, and a resume on another
    number of processes is refused with the reason. FSDP2 on synthetic data: a resume on one process re-shards the
    weights and optimizer state and says that the data split changes."""
    from ov2.checkpoint import read_weights

    full = str(tmp_path / "full")
    extra = [f"--data.source={_shard_set(tmp_path / 'shards')}", "--data.workers=2"] if data == "shards" else []
    result = torchrun("-m", "encoder", "train", "--preset", f"{family}-micro", "--out", full, *RUN, *extra,
                      f"--distributed={mode}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(p[-7:]) for p in list_checkpoints(full)] == [2, 4, 6, 8]
    logged = records(full)
    assert [r["step"] for r in logged] == [2, 4, 6, 8]  # rank 0 logs, once
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert sorted(os.listdir(latest_checkpoint(full))) == sorted(
        ["config.yaml", "sharded", "trainer.json", "rng_rank0.pt", "rng_rank1.pt"])
    parts = sorted(os.listdir(os.path.join(latest_checkpoint(full), "sharded")))
    assert parts == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one part per rank

    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step_0000008"))  # stop inside stage 2, at step 6
    result = torchrun("-m", "encoder", "train", "--out", resumed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a = read_weights(os.path.join(full, "checkpoints", "step_0000008"))  # the parts gathered in this process
    b = read_weights(os.path.join(resumed, "checkpoints", "step_0000008"))
    assert a.keys() == b.keys() and "model.vit.patch_embed.weight" in a
    for k in a:  # bit for bit: weights, optimizer state, RNG and data position all restored
        assert torch.equal(b[k], a[k]), k
    assert [r["step"] for r in records(resumed)] == [2, 4, 6, 8]
    if data == "shards" or mode == "fsdp":
        single = str(tmp_path / "single")
        shutil.copytree(full, single)
        shutil.rmtree(os.path.join(single, "checkpoints", "step_0000008"))
        result = subprocess.run([sys.executable, "-m", "encoder", "train", "--out", single, "--resume"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if data == "shards":
        assert result.returncode == 2 and "split for 2 process(es)" in result.stderr and "world 2 -> 1" in result.stderr
    elif mode == "fsdp":
        assert result.returncode == 0 and "re-sharded" in result.stderr, result.stderr[-2000:]
        whole = read_weights(os.path.join(single, "checkpoints", "step_0000008"))  # one process: model.safetensors
        assert whole.keys() == a.keys()
        first = read_weights(os.path.join(full, "checkpoints", "step_0000006"))
        moved = [k for k in a if not torch.equal(whole[k], first[k])]
        assert len(moved) > len(a) // 2  # trained on from the re-sharded state


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
