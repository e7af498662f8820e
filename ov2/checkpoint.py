"""The one checkpoint scheme of every training stage (pretraining, bridge stage 1 and 2).

    RUN/checkpoints/step_0000100/
        model.safetensors    weights (all of them, or the trainable ones for a bridge stage)
        optimizer.pt         optimizer state (tensors and numbers only; read with weights_only=True)
        trainer.json         step, data position, counters, and "files": {name: bytes} of the folder
        rng_rank{R}.pt       each process's own state: torch RNG (CPU, and its own CUDA device's where there is
                             one) and `local`, what the trainer keeps per rank (a shard stream's cursors)
        config.yaml          the stage's config (a checkpoint folder is self-contained)

    save(run, step, weights=..., optimizer=..., config=..., state=..., keep_last=3)   # every rank calls it
    found = newest(run, read)        # (folder, {"weights", "optimizer", "rng", "state"}) or None
    restore_rng(found[1])            # this rank's RNG state back in place

Each trainer only says what its weights and optimizer state are (full state dicts of a DDP / FSDP model for
pretraining; the trainable parameters for a bridge stage); saving and reading are the same for all.
Writing: every file goes into `step_N.tmp/`, each is fsynced, trainer.json (with the sizes) is written last, and
the folder is renamed to `step_N` once. A crash leaves either the old checkpoints or the new one, never half of one.
Reading: `newest(run, load)` tries the checkpoints newest first; one whose files are missing or cut (sizes differ
from trainer.json) or that fails to load is reported on stderr and the next older one is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_STEP = re.compile(r"^step_(\d+)$")
STATE = "trainer.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SHARDED = "sharded"  # a torch.distributed.checkpoint folder: {"model": ..., "optim": ...}, one file per rank


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says what was found."""


def step_path(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (temporary `.tmp` folders are not listed)."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP.match(name)))
    return [root / name for _, name in found]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(run: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (call on one process; others write into it after)."""
    tmp = step_path(run, step).with_name(step_path(run, step).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep_last: int | None = None) -> Path:
    """Write trainer.json (state + file sizes), fsync everything, rename `step_N.tmp` -> `step_N` once, prune."""
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != STATE}
    (tmp / STATE).write_text(json.dumps({**state, "files": files}, indent=1))
    for name in (*files, STATE):
        _fsync(tmp / name)
    for folder in {(tmp / name).parent for name in files} - {tmp}:
        _fsync(folder)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # the same step written again (a resumed run re-saving it): the older ones stay intact
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    if keep_last:
        for old in list_checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def damage(path: str | Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (missing or cut file), or None when it looks intact."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
    except OSError:
        return f"{STATE} is missing"
    except ValueError:
        return f"{STATE} is cut or not JSON"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"{STATE} lists no files"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def read_state(path: str | Path) -> dict:
    """The trainer state saved in a checkpoint (without the file list)."""
    state = json.loads((Path(path) / STATE).read_text())
    state.pop("files", None)
    return state


def newest(run: str | Path, load: Callable[[Path], T] | None = None, *, say=None) -> tuple[Path, T] | None:
    """(folder, load(folder)) of the newest intact checkpoint of `run`; None when the run has none at all.

    A damaged one (cut file, or `load` raising) is reported through `say` (default: one line on stderr) and skipped;
    CheckpointError when checkpoints exist but none is usable."""
    say = say or (lambda line: print(line, file=sys.stderr))
    found = list_checkpoints(run)
    problems = []
    for path in reversed(found):
        reason = damage(path)
        result = None
        if reason is None:
            try:
                result = load(path) if load else None
            except Exception as err:  # safetensors / torch.load / json raise many types for a damaged file
                reason = f"cannot be read ({(str(err).strip().splitlines() or [type(err).__name__])[0][:200]})"
        if reason is None:
            if problems:
                say(f"using checkpoint {path.name} (newer ones are damaged: {'; '.join(problems)})")
            return path, result
        problems.append(f"{path.name}: {reason}")
        say(f"warning: checkpoint {path} is damaged ({reason}); trying an older one")
    if found:
        raise CheckpointError(f"no intact checkpoint in {run}: {'; '.join(problems)}")
    return None


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank}.pt"


def rank_state(local: dict | None = None) -> dict:
    """What each rank saves of its own: the CPU RNG state, its current CUDA device's (the one it computes on), and
    the trainer's per-rank `local` dict."""
    import torch

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "local": dict(local or {})}


def save(run: str | Path, step: int, *, weights: dict, optimizer: dict, config: dict, state: dict,
         keep_last: int | None = None, local: dict | None = None, sharded: dict | None = None) -> Path:
    """The checkpoint of `step`. Collective under torchrun: every rank calls it; rank 0 makes the temporary folder,
    every rank saves its own RNG state into it, rank 0 writes `weights` (name -> tensor), the optimizer state, the
    config and the trainer `state`, and renames once. Only rank 0's weights and optimizer state are written (the
    other ranks may pass empty dicts); each rank's `local` dict goes into its own file (`read(...)["local"]`).
    `sharded` ({"model": ..., "optim": ...} state dicts of a sharded model) is written instead of `weights` and
    `optimizer` by `torch.distributed.checkpoint`, every rank its own part, into `sharded/`."""
    import torch
    from safetensors.torch import save_file

    from ov2 import distributed as dist
    from ov2.runfolder import write_config

    final = step_path(run, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main():
        begin(run, step)
    dist.barrier()
    torch.save(rank_state(local), _rng_file(tmp, dist.rank()))
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded, checkpoint_id=str(tmp / SHARDED))
    dist.barrier()
    if dist.is_main():
        if sharded is None:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(optimizer, tmp / OPTIMIZER)
        write_config(tmp, config)
        final = commit(tmp, state, keep_last)
    dist.barrier()
    return final


def read_weights(path: str | Path) -> dict:
    """The weights of a checkpoint folder (name -> tensor, on the CPU), whole: from model.safetensors, or gathered
    from a sharded checkpoint's parts in this one process."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / SHARDED).is_dir():
        return _read_sharded(path / SHARDED, "model.")
    return load_file(str(path / WEIGHTS))


def sharded_shapes(path: str | Path) -> dict | None:
    """name -> shape of a sharded checkpoint's weights (from its metadata alone), or None for a whole one."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(path) / SHARDED
    if not folder.is_dir():
        return None
    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): tuple(m.size) for k, m in meta.items()
            if k.startswith("model.") and hasattr(m, "size")}


def _read_sharded(folder: Path, prefix: str) -> dict:
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    out = {k.removeprefix(prefix): torch.empty(tuple(m.size), dtype=m.properties.dtype)
           for k, m in meta.items() if k.startswith(prefix) and hasattr(m, "size")}
    load_parts({"model": out}, folder)
    return out


def load_parts(state: dict, folder: str | Path) -> None:
    """Fill `state` in place from a sharded checkpoint folder, in a process group or in one process alone."""
    import warnings

    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp

    alone = not torch_dist.is_initialized()
    with warnings.catch_warnings():  # one process alone is meant here, not a mistake to warn about
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(folder), no_dist=alone)


def read(path: str | Path) -> dict:
    """Everything a resume needs, read (and so checked) before anything is changed: weights, optimizer state (on the
    CPU; tensors and numbers only), this rank's RNG state and `local` dict (None and {} when the checkpoint has none
    for this rank), trainer state."""
    import torch

    from ov2 import distributed as dist

    path = Path(path)
    mine = _rng_file(path, dist.rank())
    own = torch.load(mine, weights_only=True) if mine.is_file() else None
    if torch.is_tensor(own):  # written before the CUDA state and `local` were saved
        own = {"cpu": own, "cuda": None, "local": {}}
    common = {"rng": own, "local": own["local"] if own else {}, "state": read_state(path)}
    if (path / SHARDED).is_dir():  # each rank loads its part into its model: `load_sharded`
        return {"weights": None, "optimizer": None, "sharded": str(path / SHARDED), **common}
    return {"weights": read_weights(path),
            "optimizer": torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True), **common}


def restore_rng(bundle: dict) -> None:
    """Put a read checkpoint's RNG states of this rank back in place (when it has them)."""
    import torch

    own = bundle["rng"]
    if own is not None:
        torch.set_rng_state(own["cpu"])
        cuda = _own_cuda_state(own["cuda"]) if torch.cuda.is_available() else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _own_cuda_state(saved):
    """The saved CUDA RNG state of this process's current device: the one tensor saved, or, from a checkpoint that
    holds one per device then visible (older ones, `get_rng_state_all`), the current device's entry; None when it
    has none (say so)."""
    import torch

    if saved is None or torch.is_tensor(saved):
        return saved
    index = torch.cuda.current_device()
    if index < len(saved):
        return saved[index]
    print(f"note: the checkpoint holds the CUDA RNG states of {len(saved)} device(s), none for cuda:{index}; that "
          f"device's random stream starts afresh", file=sys.stderr)
    return None
