"""The run-folder contract shared by every stage (pretraining, bridge stages, export, evaluation, `ov2 run`).

    RUN/config.yaml          the stage's config (write_config: written atomically)
    RUN/metrics.jsonl        one JSON object per line, one schema for every trainer (MetricsLog): step, loss, lr,
                             elapsed_s, peak_rss_mb (peak_gpu_mb on CUDA), then the trainer's own keys; a cut last
                             line, from a crash or a full disk, is dropped on reading
    RUN/checkpoints/step_N/  training stages only
    RUN/status.json          {"state": running|ok|failed|interrupted|skipped, "key", "error", "started", "finished",
                              "wall_s", "peak_rss_mb", "pid", "host", ...}; written atomically, merged field by field
    RUN/.lock                held (POSIX record lock) by the one process that writes into RUN

    key = config_key(config_dict, *input_keys)       # 16 hex digits, stable across processes and machines
    with RunLock(run):                               # a second writer gets RunLocked naming the holder
        with track(run, key=key):                    # running -> ok | failed (error line) | interrupted
            ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

STATES = ("running", "ok", "failed", "interrupted", "skipped")


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


def config_key(*parts) -> str:
    """A short, stable hash of JSON-able parts (a config dict and the keys of the stage's inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB: the kernel's high-water mark VmHWM, which starts afresh at exec.
    (getrusage's ru_maxrss does not: a process started from a 4 GB parent reports at least 4 GB.)"""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):  # not Linux
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024.0, 1)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary name and rename; on a full disk, rewrite an existing file in place instead (in the
    blocks it already holds), so that a status can still say what happened."""
    text = json.dumps(data, indent=1, default=str) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno != errno.ENOSPC or not path.is_file():
            raise
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()


def read_status(run: str | Path) -> dict | None:
    """The status of a run folder, or None when it has none (or an unreadable one)."""
    path = Path(run) / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("state") == "running" and status.get("host") == socket.gethostname() and status.get("pid"):
        if not _alive(status["pid"]):  # a "running" status whose process is gone was killed
            status["state"] = "interrupted"
    return status


def _alive(pid) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def write_status(run: str | Path, state: str, **fields) -> dict:
    """Merge `fields` into RUN/status.json with the new state; returns the status written."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; one of {STATES}")
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    status = read_status(run) or {}
    status.update(fields, state=state)
    _write_json_atomic(run / "status.json", status)
    return status


@contextlib.contextmanager
def track(run: str | Path, **fields):
    """running on entry; ok, failed (with the error's first line) or interrupted on exit; wall time and peak RSS."""
    start = time.time()
    write_status(run, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), pid=os.getpid(),
                 host=socket.gethostname(), error=None, **fields)

    def end(state: str, error: str | None = None) -> None:
        write_status(run, state, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(time.time() - start, 2),
                     peak_rss_mb=peak_rss_mb(), error=error)

    try:
        yield
    except KeyboardInterrupt:
        end("interrupted", "interrupted")
        raise
    except BaseException as err:
        end("failed", (str(err).strip().splitlines() or [type(err).__name__])[0])
        raise
    end("ok")


class RunLock:
    """An exclusive, non-blocking lock on RUN/.lock for as long as the `with` block runs (released on any exit,
    kill -9 included, since the kernel drops the process's record locks with it; forked children never hold it)."""

    _held: set[str] = set()  # record locks do not exclude the process itself: remember what it holds

    def __init__(self, run: str | Path):
        self.run = Path(run)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run.mkdir(parents=True, exist_ok=True)
        if str(self.run.resolve()) in RunLock._held:
            raise RunLocked(f"{self.run} is in use by pid {os.getpid()} on {socket.gethostname()} (this process)")
        fd = os.open(self.run / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:  # a POSIX record lock: not inherited by forked data-loader workers, dropped when this process dies
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.run} is in use by {holder}: wait for it to finish or choose another folder") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        RunLock._held.add(str(self.run.resolve()))
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            RunLock._held.discard(str(self.run.resolve()))


def check_unlocked(run: str | Path) -> None:
    """RunLocked (naming the holder) when another process holds RUN; writes nothing (for checks before a run)."""
    path = Path(run) / ".lock"
    if not path.is_file():
        return
    if str(Path(run).resolve()) in RunLock._held:  # (and never open+close the lock file of a lock we hold)
        raise RunLocked(f"{run} is in use by pid {os.getpid()} on {socket.gethostname()} (this process)")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        raise RunLocked(f"{run} is in use by {holder}: wait for it to finish or choose another folder") from None
    finally:
        os.close(fd)


def write_config(folder: str | Path, tree: dict) -> Path:
    """FOLDER/config.yaml from a config dict (keys in their order), written atomically: a temporary name, one rename."""
    import yaml

    folder = Path(folder)
    tmp = folder / f".config.yaml.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(tree, sort_keys=False))
    os.replace(tmp, folder / "config.yaml")
    return folder / "config.yaml"


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process in MiB (the current device), or None when CUDA is not in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


class MetricsLog:
    """RUN/metrics.jsonl in the one schema of every trainer. Each record starts with

        step, loss, lr, elapsed_s (seconds since the run began, resumes included), peak_rss_mb (peak_gpu_mb on CUDA)

    and goes on with the trainer's own keys (stage, tokens, samples_per_s, the loss terms ...).

        log = MetricsLog(run, elapsed=state["elapsed"], write=dist.is_main())  # the elapsed time a checkpoint saved
        record = log.write(step, loss, lr, stage=1)                             # appended (on the writing rank)
        state["elapsed"] = log.elapsed()                                        # goes into the next checkpoint
    """

    FIELDS = ("step", "loss", "lr", "elapsed_s", "peak_rss_mb")

    def __init__(self, run: str | Path, *, elapsed: float = 0.0, write: bool = True):
        self.path = Path(run) / "metrics.jsonl"
        self.offset, self.start, self.enabled = float(elapsed), time.perf_counter(), write

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.start

    def write(self, step: int, loss: float, lr: float, **extra) -> dict:
        """The record of `step` (returned; appended to the file when this process writes)."""
        clash = set(extra) & {*self.FIELDS, "peak_gpu_mb"}
        if clash:
            raise ValueError(f"metrics: {sorted(clash)} are set by MetricsLog itself")
        record = {"step": step, "loss": loss, "lr": lr, "elapsed_s": round(self.elapsed(), 3),
                  "peak_rss_mb": peak_rss_mb()}
        gpu = peak_gpu_mb()
        if gpu is not None:
            record["peak_gpu_mb"] = gpu
        record.update(extra)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a cut or unparsable last line (crash, full disk) is dropped, not fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return records


def rewrite_metrics(path: str | Path, keep_until_step: int) -> None:
    """After a resume: keep the records up to the checkpoint's step (they are written again after it)."""
    path = Path(path)
    records = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def read_run(run: str | Path) -> dict:
    """What any reader (--resume, the runner, the report) needs of a training run folder, pretraining and bridge
    stages alike: status, config, metrics, the completed checkpoints' steps, the newest intact checkpoint's step."""
    import yaml

    from ov2 import checkpoint

    run = Path(run)
    config_path = run / "config.yaml"
    found = checkpoint.newest(run, say=lambda line: None) if checkpoint.list_checkpoints(run) else None
    return {
        "status": read_status(run),
        "config": yaml.safe_load(config_path.read_text()) if config_path.is_file() else None,
        "metrics": read_metrics(run / "metrics.jsonl"),
        "checkpoints": [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(run)],
        "step": checkpoint.read_state(found[0])["step"] if found else 0,
    }

