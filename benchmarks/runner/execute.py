"""Run a plan: each stage in a fresh process, skipped when done, resumed when interrupted, isolated when it fails.

For each stage, in plan order:
    - done before with the same key (status ok)            -> cached, not run again (also when it sits in
                                                              .superseded/: a reverted change brings it back)
    - a folder of another key (the config changed)         -> moved to RUN/encoders/<enc>/.superseded/ (nothing lost)
    - unfinished with the same key                         -> training stages resume from their checkpoints; the
                                                              others start again
    - an upstream stage failed or was skipped              -> skipped, with the reason
The child's stderr (progress bars, errors) goes to the terminal and to the stage's stage.log; its stdout to the log.
Wall time and peak memory (the child's peak resident set, from wait4) go into the stage's status.json.
A finished training stage drops the resume points nothing reads again (a cached stage is never resumed): a bridge's
stage checkpoints (1.6 GB each for SmolLM2's stage 2: the LLM and its optimiser state) and all but the newest
pretraining checkpoint (the encoder's weights).
A full disk while the runner itself writes stops the run: the stage's status says so (rewritten in place when no
new file fits) and the OSError goes up to `ov2 run`, which prints one line; the same command resumes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner.plan import Stage
from ov2.checkpoint import list_checkpoints
from ov2.runfolder import read_status, write_status

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # the stage process must not outlive a killed runner (it would hold its folder)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _last_line(text: str) -> str:
    for line in reversed(text.replace("\r", "\n").splitlines()):
        line = line.strip()
        if line and not line.startswith(("warnings.warn", "  ")):
            return line[:400]
    return ""


def _stage_meta_of(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "stage.json").read_text())
    except (OSError, ValueError):
        return None


def _stage_meta(stage: Stage) -> dict | None:
    return _stage_meta_of(stage.folder)


def _write_meta(stage: Stage) -> None:
    """RUN/encoders/<enc>/<stage>/stage.json: the key the folder belongs to, and how the stage is run."""
    stage.folder.mkdir(parents=True, exist_ok=True)
    (stage.folder / "stage.json").write_text(json.dumps(
        {"key": stage.key, "encoder": stage.encoder, "label": stage.label, "seed": stage.seed, "stage": stage.name,
         "deps": stage.deps, "command": stage.command}, indent=1))


def _supersede(stage: Stage, old_key: str) -> Path:
    dest = stage.folder.parent / ".superseded" / f"{stage.name}-{old_key}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage.folder), dest)
    return dest


def _restore(stage: Stage) -> dict | None:
    """A finished folder of this very key in .superseded/ (a change was reverted): put it back, keeping the current
    folder in .superseded/ in its turn; -> its status, or None when there is none."""
    for old in sorted((stage.folder.parent / ".superseded").glob(f"{stage.name}-{stage.key}-*"), reverse=True):
        status, meta = read_status(old), _stage_meta_of(old)
        if status and status.get("state") == "ok" and meta and meta.get("key") == stage.key:
            if stage.folder.exists():
                _supersede(stage, (_stage_meta(stage) or {}).get("key", "unknown"))
            shutil.move(str(old), stage.folder)
            return status
    return None


def _command(stage: Stage) -> list[str]:
    if stage.name == "pretrain" and any((stage.folder / "checkpoints").glob("step_*")):
        return [*stage.command, "--resume"]
    return stage.command


def _spawn(stage: Stage, log_path: Path) -> tuple[int, float, str]:
    """Run the stage's command; -> (exit code, peak RSS in MB of the child, its stderr tail)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail = b""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(_command(stage))}\n".encode())
        log.flush()
        proc = subprocess.Popen(_command(stage), stdout=log, stderr=subprocess.PIPE, env=env,
                                preexec_fn=_die_with_parent)
        try:
            while chunk := os.read(proc.stderr.fileno(), 4096):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log.write(chunk)
                tail = (tail + chunk)[-8192:]
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
    return proc.returncode, round(usage.ru_maxrss / 1024.0, 1), tail.decode(errors="replace")


def _keyed_status(stage: Stage) -> tuple[dict | None, dict | None]:
    """(the stage folder's meta, its status when that meta is this stage's key, else None)."""
    meta, status = _stage_meta(stage), read_status(stage.folder)
    return meta, status if meta and meta.get("key") == stage.key else None


def run_stage(stage: Stage, position: str, started: float) -> dict:
    """Run (or skip) one stage; -> its final status."""
    meta, status = _keyed_status(stage)
    head = f"[{position}] {stage.encoder} · {stage.name}"
    if status and status.get("state") == "ok":
        print(f"{head}: done before (key {stage.key}), skipped", file=sys.stderr, flush=True)
        return {**status, "cached": True}
    restored = _restore(stage)
    if restored:
        print(f"{head}: done before (key {stage.key}), restored from .superseded/", file=sys.stderr, flush=True)
        return {**restored, "cached": True}
    if stage.folder.exists() and (meta is None or meta.get("key") != stage.key):
        moved = _supersede(stage, (meta or {}).get("key", "unknown"))
        print(f"{head}: settings changed; the old folder is kept at {moved}", file=sys.stderr, flush=True)
    elif stage.folder.exists() and not stage.resumable:
        shutil.rmtree(stage.folder)  # an unfinished evaluation or export starts again
    resuming = stage.folder.exists()
    _write_meta(stage)
    print(f"{head}: {'resuming' if resuming else 'starting'} (elapsed {_fmt(time.time() - started)})",
          file=sys.stderr, flush=True)
    t0 = time.time()
    write_status(stage.folder, "running", key=stage.key, started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None,
                 pid=os.getpid(), host=os.uname().nodename, peak_rss_mb=None)
    try:
        code, peak, tail = _spawn(stage, stage.folder / "stage.log")
    except KeyboardInterrupt:
        write_status(stage.folder, "interrupted", key=stage.key, error="interrupted", wall_s=round(time.time() - t0, 2))
        raise
    wall = round(time.time() - t0, 2)
    # The stage's own VmHWM when it records one (pretrain, bridge, eval); else the child's ru_maxrss, which also
    # counts this runner's resident set at the moment it started the child.
    peak = (read_status(stage.folder) or {}).get("peak_rss_mb") or peak
    fields = dict(key=stage.key, wall_s=wall, peak_rss_mb=peak, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  exit_code=code)
    if code == 0:
        result = write_status(stage.folder, "ok", error=None, **fields)
        prune(stage)
        print(f"{head}: ok in {_fmt(wall)}, peak {peak / 1024:.2f} GB", file=sys.stderr, flush=True)
    else:
        state = "interrupted" if code in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL) else "failed"
        error = _last_line(tail) or f"exit code {code}"
        result = write_status(stage.folder, state, error=error, **fields)
        print(f"{head}: {state.upper()}: {error}", file=sys.stderr, flush=True)
    return result


def prune(stage: Stage) -> None:
    """Drop a finished training stage's resume points that nothing reads again (the module's docstring)."""
    if stage.name == "bridge":
        for checkpoints in stage.folder.glob("stage*/checkpoints"):
            shutil.rmtree(checkpoints, ignore_errors=True)
    elif stage.name == "pretrain":
        for old in list_checkpoints(stage.folder)[:-1]:
            shutil.rmtree(old, ignore_errors=True)


def mark_skipped(stage: Stage, reason: str, position: str) -> dict:
    meta, status = _keyed_status(stage)
    print(f"[{position}] {stage.encoder} · {stage.name}: skipped ({reason})", file=sys.stderr, flush=True)
    if status and status.get("state") == "ok":
        return {**status, "cached": True}
    if stage.folder.exists() and (meta is None or meta.get("key") != stage.key):
        _supersede(stage, (meta or {}).get("key", "unknown"))
    _write_meta(stage)
    return write_status(stage.folder, "skipped", key=stage.key, error=reason)


def execute(stages: list[Stage]) -> dict[str, dict]:
    """Run every stage in order; -> {stage id: final status}. KeyboardInterrupt propagates (after recording it)."""
    started = time.time()
    results: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        position = f"{i + 1}/{len(stages)}"
        bad = [d for d in stage.deps if results.get(d, {}).get("state") != "ok"]
        try:
            if bad:
                why = f"{bad[0]} {results[bad[0]].get('state', 'did not run')}"
                results[stage.id] = mark_skipped(stage, why, position)
            else:
                results[stage.id] = run_stage(stage, position, started)
        except OSError as err:  # the runner's own writes: a full disk, the run folder gone or read-only
            _record_failure(stage, err)
            raise
    return results


def _record_failure(stage: Stage, err: OSError) -> None:
    """Say in the stage's status (when one can still be written) why the runner stopped there."""
    reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    try:
        write_status(stage.folder, "failed", key=stage.key, error=f"{reason}: {err.filename or stage.folder}",
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    except OSError:
        pass


FINAL = ("ok", "failed", "skipped", "interrupted")


def _final(stage: Stage, wait_s: float, poll_s: float = 2.0) -> str | None:
    """The state node 0 gave `stage` once final (its key matching), waiting up to `wait_s`; None if it never came."""
    deadline = time.time() + wait_s
    while True:
        status = _keyed_status(stage)[1]
        if status and status.get("state") in FINAL:
            return status["state"]
        if time.time() >= deadline:
            return None
        time.sleep(poll_s)


def follow(stages: list[Stage], node_rank: int, wait_s: float = 24 * 3600) -> int:
    """A machine other than node 0 of a multi-node run: take part in each distributed stage (torchrun meets node 0's
    processes), in the plan's order, once node 0 has finished what it reads; write nothing of the run's (node 0
    owns every status, result and report; this machine's output goes beside the stage folder, STAGE.node{R}.log, as
    a stage folder holds only what its command writes). -> exit code."""
    from benchmarks.runner.plan import distributed

    by_id, failed = {s.id: s for s in stages}, 0
    for i, stage in enumerate(stages):
        head = f"[{i + 1}/{len(stages)}] {stage.encoder} · {stage.name}"
        if not distributed(stage):
            continue  # node 0 runs it alone
        states = {d: _final(by_id[d], wait_s) for d in stage.deps}
        if any(state != "ok" for state in states.values()):
            print(f"{head}: skipped on node {node_rank} (upstream: {states})", file=sys.stderr, flush=True)
            continue
        if (_keyed_status(stage)[1] or {}).get("state") == "ok":
            continue  # done before: node 0 skips it too
        print(f"{head}: joining on node {node_rank}", file=sys.stderr, flush=True)
        stage.folder.parent.mkdir(parents=True, exist_ok=True)
        code, _, tail = _spawn(stage, stage.folder.with_name(f"{stage.folder.name}.node{node_rank}.log"))
        if code:
            failed += 1
            print(f"{head}: FAILED on node {node_rank} (exit {code}): {_last_line(tail)}", file=sys.stderr, flush=True)
    return 1 if failed else 0
