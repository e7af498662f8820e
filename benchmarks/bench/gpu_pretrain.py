"""The GPU check's two pretraining checks (`benchmarks.bench.gpu_check`), each a command of its own:

    python -m benchmarks.bench.gpu_pretrain throughput --preset ov2-l14 --batch 256 --steps 8 --out /tmp/t --bf16=true
    python -m benchmarks.bench.gpu_pretrain fsdp-resume --preset ov2-tiny --batch 32 --out /tmp/f
    python -m benchmarks.bench.gpu_pretrain throughput --preset ov2-micro --batch 16 --steps 4 --out /tmp/t   # CPU

throughput   `ov2 train` at the preset's final image size: warm-up steps, then --steps timed steps of one
             micro-step each, at the largest micro-batch (--batch, halved after each out-of-memory) that fits one
             process (the preset's own `micro_batch`, an upper bound counted on the meta device, is reported beside
             it). Reports images/s
             (median of the timed steps), step time and peak memory (GPU allocator on CUDA, resident set on the CPU),
             read from the run's metrics.jsonl.
fsdp-resume  `ov2 train --distributed=fsdp` under `torchrun --nproc_per_node=1` (NCCL on a GPU, gloo on the CPU),
             with the model sharded by FSDP2 although there is one process (`ov2.distributed.wrap` leaves a model
             alone at world size 1, so the worker makes it shard: see `shard_alone`). Six steps over two stages,
             a sharded checkpoint (torch.distributed.checkpoint) every two; then a copy of the run without its last
             checkpoint is resumed from step 4. Passes when the resumed run ends where the uninterrupted one did:
             the same step, data position and RNG states (CPU and CUDA), the same losses and weights (bit for bit on
             the CPU; on a GPU within 1e-3 of the loss, since cuBLAS, SDPA and the Triton backward's float32 atomics
             are not deterministic).
Extra `--key=value` arguments go to `ov2 train`. Run folders (checkpoints included) go under --out; the harness
deletes them. The measurements are one JSON line on stdout (and the harness's result file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench.gpu_check import report
from benchmarks.bench.results import ROOT
from ov2.cli import ArgumentParser, fail, positive

PY = [sys.executable]
FSDP_RUN = ["--stages.0.steps=2", "--stages.1.steps=4", "--stages.0.warmup_steps=1", "--stages.1.warmup_steps=1",
            "--ckpt_every=2", "--keep_last=4", "--log_every=1", "--data.workers=0", "--distributed=fsdp"]
LOSS_TOL_CUDA = 1e-3  # relative; on the CPU the resumed run must match bit for bit


def _train(args: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
    """`ov2 train ARGS` in a fresh process (the one-process FSDP2 worker under torchrun with `torchrun`)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [*PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "benchmarks.bench.gpu_pretrain", "train-alone"] if torchrun else [*PY, "-m", "ov2", "train"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=env)


def _records(run: Path) -> list[dict]:
    from ov2.runfolder import read_metrics

    return read_metrics(str(run / "metrics.jsonl"))


def run_numbers(run: Path, batch: int, last_stage: int) -> dict:
    """images/s (median over the last stage's logged steps but its first), step time, peak memory of a run."""
    records = [r for r in _records(run) if r.get("stage") == last_stage]
    timed = records[1:] or records
    per_s = statistics.median(r["samples_per_s"] for r in timed)
    gpu = [r["peak_gpu_mb"] for r in records if r.get("peak_gpu_mb")]
    return {"images_per_s": round(per_s, 2), "step_s": round(batch / per_s, 4),
            "peak_mb": round(max(gpu or [r["peak_rss_mb"] for r in records]), 1),
            "peak_kind": "GPU allocator" if gpu else "resident set", "timed_steps": len(timed)}


def throughput(preset: str, out: Path, batch: int, steps: int, extra: list[str]) -> int:
    """The `throughput` command: the largest batch (halving from `batch`) that fits, and its numbers."""
    from encoder.config import get_preset

    cfg = get_preset(preset)
    size, stages = cfg.model.vit.image_size, len(cfg.stages)
    while batch >= 1:
        run = out / f"b{batch}"
        per_stage = [f"--stages.{i}.{key}={value}" for i in range(stages) for key, value in
                     (("image_size", size), ("batch_size", batch), ("steps", steps + 1 if i == stages - 1 else 1))]
        res = _train(["--preset", preset, "--out", str(run), *per_stage, f"--micro_batch={batch}", "--log_every=1",
                      "--ckpt_every=1000000", "--keep_last=1", *extra])
        if res.returncode == 0:
            numbers = run_numbers(run, batch, stages)
            shutil.rmtree(run, ignore_errors=True)  # its checkpoints (~5 GB for L/14) are not needed
            report({"preset": preset, "image_size": size, "micro_batch": batch, "preset_micro_batch": cfg.micro_batch,
                    **numbers})
            return 0
        shutil.rmtree(run, ignore_errors=True)
        if "out of memory" not in (res.stderr + res.stdout).lower():
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"batch {batch}: out of memory", file=sys.stderr)
        batch //= 2
    print("no batch fits", file=sys.stderr)
    return 1


@contextlib.contextmanager
def shard_alone():
    """Make `ov2.distributed.wrap` shard with FSDP2 at world size 1 (its only test of the world size is made to
    read 2 while it wraps); refuse when the model came back unsharded."""
    from unittest import mock

    from torch.distributed.tensor import DTensor

    from ov2 import distributed as dist

    wrap = dist.wrap

    def wrap_alone(model, *args, **kwargs):
        with mock.patch.object(dist, "world_size", lambda: 2):
            wrapped = wrap(model, *args, **kwargs)
        if not any(isinstance(p, DTensor) for p in wrapped.parameters()):
            raise RuntimeError("ov2.distributed.wrap did not shard the model with FSDP2 on one process")
        return wrapped

    with mock.patch.object(dist, "wrap", wrap_alone):
        yield


def train_alone(argv: list[str]) -> int:
    """The `train-alone` worker (under torchrun, one process): join a one-process group (NCCL on a GPU, gloo on the
    CPU), then `ov2 train ARGV` with the model sharded by FSDP2."""
    import torch.distributed as torch_dist

    from encoder.cli import train_main
    from ov2 import distributed as dist

    device = dist.setup()  # binds the GPU; no group at world size 1
    if device.type == "cuda":
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        torch_dist.init_process_group("gloo")
    with shard_alone():
        return train_main(argv)


def _same(a, b) -> bool:
    """Equal, bit for bit, through dicts and lists of tensors."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _compare(full: Path, resumed: Path, step: int, cuda: bool) -> tuple[dict, list[str]]:
    """(measurements, problems) of a resumed run against the uninterrupted one, at their last checkpoint."""
    import torch

    from ov2.checkpoint import read_state, read_weights, step_path

    a_dir, b_dir = step_path(full, step), step_path(resumed, step)
    a, b = read_weights(a_dir), read_weights(b_dir)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else None
    rng = _same(*(torch.load(d / "rng_rank0.pt", weights_only=True) for d in (a_dir, b_dir)))
    losses = {r["step"]: r["loss"] for r in _records(full)}
    later = [r for r in _records(resumed) if r["step"] > step - 2]
    loss_diff = max(abs(r["loss"] - losses[r["step"]]) / max(1.0, abs(losses[r["step"]])) for r in later)
    keep = ("step", "position", "seen")
    state_a, state_b = read_state(a_dir), read_state(b_dir)
    measured = {"sharded_parts": sorted(p.name for p in (a_dir / "sharded").glob("*.distcp")),
                "resumed_from": step - 2, "max_weight_diff": diff, "max_loss_diff": loss_diff, "rng_equal": rng}
    problems = [f"{k} {state_b.get(k)} != {state_a.get(k)}" for k in keep if state_a.get(k) != state_b.get(k)]
    problems += [] if rng else ["the RNG states differ"]
    problems += ["the weights differ"] if diff is None or (diff > 0 and not cuda) else []
    problems += [f"losses differ by {loss_diff:.2e}"] if loss_diff > (LOSS_TOL_CUDA if cuda else 0.0) else []
    return measured, problems


def fsdp_resume(preset: str, out: Path, batch: int, extra: list[str]) -> int:
    """The `fsdp-resume` command: an uninterrupted one-process FSDP2 run, and a resume of its copy from step 4."""
    import torch

    from ov2.checkpoint import list_checkpoints, step_path

    full, resumed = out / "full", out / "resumed"
    sizes = [f"--stages.{i}.batch_size={batch}" for i in range(2)]
    res = _train(["--preset", preset, "--out", str(full), *FSDP_RUN, *sizes, *extra], torchrun=True)
    found = [p.name for p in list_checkpoints(full)]
    if res.returncode == 0 and (found != [step_path(full, s).name for s in (2, 4, 6)]
                                or not (step_path(full, 6) / "sharded").is_dir()):
        print(f"expected sharded checkpoints at steps 2, 4, 6; found {found}", file=sys.stderr)
        return 1
    if res.returncode == 0:
        shutil.copytree(full, resumed)
        shutil.rmtree(step_path(resumed, 6))  # as if stopped after step 4
        res = _train(["--out", str(resumed), "--resume"], torchrun=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return 1
    measured, problems = _compare(full, resumed, 6, torch.cuda.is_available())
    report({**measured, "run": run_numbers(full, batch, 2)})
    if problems:
        print(f"the resumed run differs from the uninterrupted one: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-alone"]:
        return train_alone(argv[1:])
    parser = ArgumentParser(prog="gpu_pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["throughput", "fsdp-resume"])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True, help="folder for the run folders (made if missing)")
    parser.add_argument("--batch", type=positive(int), required=True, help="(starting) batch")
    parser.add_argument("--steps", type=positive(int), default=8, help="timed steps (throughput)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        return fail(parser.prog, f"expected --key=value overrides for ov2 train, got {bad[0]!r}")
    from encoder.config import ConfigError, get_preset

    try:
        get_preset(args.preset)
    except ConfigError as err:
        return fail(parser.prog, err)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "throughput":
        return throughput(args.preset, out, args.batch, args.steps, extra)
    return fsdp_resume(args.preset, out, args.batch, extra)


if __name__ == "__main__":
    sys.exit(main())
