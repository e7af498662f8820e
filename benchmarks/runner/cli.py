"""`ov2 run EXPERIMENT.yaml [--out RUN] [--quick]`: train encoders, bridge them to an LLM, evaluate, tabulate, report.

    ov2 run benchmarks/runner/experiments/default.yaml                 # ov2 vs ov1 vs clip on 2 CPU cores (~1 h)
    ov2 run benchmarks/runner/experiments/default.yaml --quick         # smoke: tiny steps, a few questions per task
    ov2 run exp.yaml --out runs/exp                             # again: finished stages are skipped, others resume

Stages per encoder: pretrain -> export -> bridge (stage 1, stage 2, LLaVA export) -> eval (lmms-eval) and
encoder_eval (Fashion-MNIST); then RUN/results.csv + results.parquet and RUN/report/index.html. A failed stage is
recorded, what depends on it is skipped, the rest goes on, and the command exits 1 with one line per failure.
Ctrl-C stops cleanly (exit 130); the same command resumes. The run folder layout is in benchmarks/runner/plan.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ov2", "torch", "transformers", "lmms-eval", "datasets", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() + ("+dirty" if dirty else "")) if res.returncode == 0 else None


def _check_out(out: Path, force: bool) -> str | None:
    """An error line if --out is not ours to write into."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file"
    if out.is_dir() and any(out.iterdir()) and not (out / "run.json").is_file() and not force:
        return f"--out {out} is a non-empty folder that is not an ov2 run: choose another or pass --force"
    for name in ("encoders", "report", "data"):  # the runner's own folders inside RUN
        if (out / name).exists() and not (out / name).is_dir():
            return f"--out {out}: {out / name} is a file where the run keeps its {name}/ folder; move it away"
    return None


def main(argv: list[str] | None = None) -> int:
    from ov2.cli import ArgumentParser

    parser = ArgumentParser(prog="ov2 run", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment YAML (see benchmarks/runner/experiments/default.yaml)")
    parser.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    parser.add_argument("--quick", action="store_true", help="apply the experiment's `quick:` section (smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (stages, keys, commands) and stop")
    parser.add_argument("--no-report", action="store_true", help="do not build RUN/report/index.html")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an ov2 run")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R",
                        help="this machine's place in a multi-node run (`nnodes:` > 1 in the experiment; --out on a "
                             "filesystem every machine shares): 0 runs the plan and writes everything, 1..nnodes-1 "
                             "start the same command with their rank and join each distributed stage")
    args = parser.parse_args(argv)

    from benchmarks.runner import results
    from benchmarks.runner.execute import execute
    from benchmarks.runner.experiment import load, to_dict
    from benchmarks.runner.plan import OV2, build_plan
    from ov2.cli import fail, os_error
    from ov2.config import ConfigError
    from ov2.runfolder import RunLock, RunLocked

    prog = "ov2 run"
    try:
        exp = load(args.experiment, quick=args.quick)
        if not 0 <= args.node_rank < exp.nnodes:
            return fail(prog, f"--node-rank {args.node_rank} is not one of the experiment's {exp.nnodes} machine(s) "
                              f"(0..{exp.nnodes - 1}; nnodes: in the experiment file)")
        exp.node_rank = args.node_rank
        out = Path(args.out or f"runs/{exp.name}{'-quick' if args.quick else ''}").absolute()
        problem = None if args.node_rank else _check_out(out, args.force)
        if problem:
            return fail(prog, problem)
        stages = build_plan(exp, out)  # checks every override on its stage's real config
    except ConfigError as err:  # an ExperimentError too
        return fail(prog, err)
    if args.node_rank and not args.dry_run:
        from benchmarks.runner.execute import follow

        print(f"ov2 run: {exp.name}: node {args.node_rank} of {exp.nnodes}, joining the distributed stages of {out}",
              file=sys.stderr, flush=True)
        try:
            return follow(stages, args.node_rank)
        except KeyboardInterrupt:
            return 130
    if args.dry_run:
        for i, st in enumerate(stages):
            print(f"{i + 1:>3}  {st.id:<28} key {st.key}  {' '.join(st.command)}")
        return 0
    import yaml

    try:
        lock = RunLock(out).__enter__()
    except RunLocked as err:
        return fail(prog, err)
    except OSError as err:
        return fail(prog, f"cannot write to {out}: {err.strerror}")
    try:
        (out / "experiment.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
        info = {"experiment": exp.name, "experiment_file": str(Path(args.experiment).absolute()), "quick": args.quick,
                "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
                "git_commit": _git_commit(), "versions": _versions(), "machine": _machine()}
        (out / "run.json").write_text(json.dumps(info, indent=1))
        print(f"ov2 run: {exp.name}: {len(exp.encoders)} encoder(s) x {len(exp.seeds)} seed(s), {len(stages)} stages "
              f"-> {out}", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            statuses = execute(stages)
        except KeyboardInterrupt:
            print(f"\nov2 run: interrupted; resume with: ov2 run {args.experiment} --out {out}"
                  f"{' --quick' if args.quick else ''}", file=sys.stderr)
            return 130
        table = results.collect(exp.name, stages)
        results.write(table, out)
        info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(time.time() - t0, 1))
        (out / "run.json").write_text(json.dumps(info, indent=1))
        print("\n" + results.pivot_text(table) + "\n")
        failures = [(sid, s) for sid, s in statuses.items() if s.get("state") == "failed"]
        if exp.report and not args.no_report:
            # `ov2 report` in a process of its own, as every stage: the runner imports no report code, and a report
            # problem is one failure line beside results that are already on disk
            done = subprocess.run([*OV2, "report", str(out)], capture_output=True, text=True)
            if done.returncode == 0:
                print(f"report: {out / 'report' / 'index.html'}")
            else:
                error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                failures.append(("report", {"error": error.removeprefix("ov2 report: error: ")}))
        print(f"results: {out / 'results.csv'}")
        for sid, s in failures:
            print(f"FAILED {sid}: {s.get('error')}", file=sys.stderr)
        skipped = sum(s.get("state") == "skipped" for s in statuses.values())
        if failures:
            print(f"ov2 run: {len(failures)} failed, {skipped} skipped of {len(stages)} stages", file=sys.stderr)
            return 1
        return 0
    except OSError as err:  # a full disk or a run folder we may not write (the stages record their own failures)
        if err.errno == errno.ENOSPC:  # mid-run: a failure while running; what finished is kept
            return fail(prog, f"no space left on the device ({err.filename or out}); free some and run the same "
                              f"command to resume", 1)
        return os_error(prog, err)
    finally:
        lock.__exit__(None, None, None)
