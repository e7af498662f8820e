"""Checks made before a training stage writes anything into its run folder.

    check_out(out)                       --out must be a folder we can write (or create), with space left
    check_resume(out, cfg, step, safe=RESUME_SAFE, architecture=ARCHITECTURE)
                                         a resume may not change what was already computed: the architecture and
                                         the recipe must equal the saved config.yaml; only the keys in `safe`
                                         (bookkeeping: how often it logs and saves, how it reads data, how it runs on
                                         the machine) may differ. Each stage defines its own next to its config.
    saved_config(out) -> dict | None     OUT/config.yaml as a dict (ConfigError when it is damaged)
    diff_configs(a, b) -> [(key, a, b)]  the differing leaves of two config dicts
"""

from __future__ import annotations

import dataclasses
import errno
import shutil
import tempfile
from pathlib import Path

import yaml

from ov2.config import ConfigError, leaves

MIN_FREE_MB = 64


def check_out(out: str | Path) -> None:
    """ConfigError when `out` is a file, cannot be created or written, or sits on a (nearly) full disk."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is a file, not a folder")
    try:  # really write (os.access says yes to root on a read-only file system)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ConfigError(f"--out {out}: no space left on the device") from None
        raise ConfigError(f"--out {out}: {probe} is not writable ({err.strerror})") from None
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise ConfigError(f"--out {out}: no space left on the device ({free_mb:.0f} MB free)")


def diff_configs(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    a, b = leaves(saved, dicts=True), leaves(now, dicts=True)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _matches(key: str, names) -> bool:
    """`key` (dotted) is one of `names`, given as a full key, a leaf name, or a prefix (`model` covers model.*)."""
    return any(key == n or key.split(".")[-1] == n or key.startswith(n + ".") for n in names)


def saved_config(out: str | Path) -> dict | None:
    """OUT/config.yaml as a dict; None when there is none; ConfigError when it is not valid YAML or not a mapping."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {path} is not valid YAML") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a config")
    return saved


def check_resume(out: str | Path, cfg, step: int, saved: dict | None = None, *, safe: tuple[str, ...],
                 architecture: tuple[str, ...] = (), where: str = "--resume") -> None:
    """Compare `cfg` (a dataclass) with the run's saved config (`saved`, or OUT/config.yaml) before anything is
    written.

    Keys in `safe` may change. Steps may grow (the run goes on longer) but never fall below the checkpoint's step;
    any other change is an error naming the differing keys: those of `architecture` first ("cannot change the
    architecture"), else the recipe's. `where` names what is refused (the default: "--resume")."""
    if saved is None:
        saved = saved_config(out)
        if saved is None:
            return
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: {out}/config.yaml does not hold a config")
    changed = [d for d in diff_configs(saved, dataclasses.asdict(cfg)) if not _matches(d[0], safe)]
    steps = [d for d in changed if d[0].split(".")[-1] == "steps"]
    other = [d for d in changed if d not in steps]
    if other:
        model = [d for d in other if any(d[0] == n or d[0].startswith(n + ".") for n in architecture)]
        what = "the architecture" if model else "the recipe"
        listed = ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, a, b in (model or other)[:6])
        raise ConfigError(f"{where} cannot change {what}: {listed}; resume without these overrides or use another "
                          f"--out")
    total = getattr(cfg, "total_steps", None)
    if total is not None and total < step:
        raise ConfigError(f"{where}: the checkpoint is at step {step} but the config has only {total} steps")
