"""Write a built-in task's data as a `datasets` folder (`DatasetDict({"test": ...}).save_to_disk`), as the task
YAMLs in benchmarks/evals/tasks load it (`dataset_kwargs: {load_from_disk: true}`).

    build_task("ov2_gqa", "data/ov2_gqa", n=100)   # -> the folder; the same arguments always give the same bytes
    ensure_data(["ov2_gqa", "ov2_pope"], "data")   # builds the missing ones (default sizes), returns their folders

Columns: id, image_id (int), image (PNG), question (without the prompt suffix), answer, type (str).
`ov2_suite.json` beside the data records task, n, seed, image size and chance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from benchmarks.evals.suite import reading, shapes
from benchmarks.evals.suite.tasks import TRAIN_OFFSET, get_task

GENERATORS = {
    "ov2_textvqa": reading.make_textvqa, "ov2_chartqa": reading.make_chartqa, "ov2_ocrbench": reading.make_ocrbench,
    "ov2_mme": shapes.make_mme, "ov2_seed": shapes.make_seed, "ov2_sqa": reading.make_sqa, "ov2_gqa": shapes.make_gqa,
    "ov2_pope": shapes.make_pope, "ov2_fashion": reading.make_fashion,
}  # a TaskSpec with `generator` set shares another task's (ov2_gqa_unseen: ov2_gqa's over held-out scenes)
COLUMNS = ("id", "image_id", "image", "question", "answer", "type")


def generate(name: str, n: int | None = None, seed: int | None = None, size: int = 64, split: str = "test"
             ) -> list[dict]:
    """A task's records: its test split (what it scores), or its train split (split="train": seed + TRAIN_OFFSET,
    Fashion-MNIST train images), which a bridge's stage-2 mix may hold (bridge.data.TaskMix)."""
    spec = get_task(name)
    seed = spec.seed if seed is None else seed
    if split == "train":
        seed += TRAIN_OFFSET
    elif split != "test":
        raise ValueError(f"split must be test or train, got {split!r}")
    make = GENERATORS[spec.generator or name]
    return make(spec.n if n is None else n, seed, size, heldout=spec.heldout, split=split)


def build_task(name: str, out: str | Path, n: int | None = None, seed: int | None = None, size: int = 64) -> Path:
    import datasets

    spec = get_task(name)
    n = spec.n if n is None else n
    seed = spec.seed if seed is None else seed
    if n < 1:
        raise ValueError(f"{name}: n must be at least 1, got {n}")
    rows = generate(name, n, seed, size)
    features = datasets.Features({"id": datasets.Value("int64"), "image_id": datasets.Value("int64"),
                                  "image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "type": datasets.Value("string")})
    table = {c: [r[c] for r in rows] for c in COLUMNS}
    data = datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)})
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # written aside, renamed once: never half a folder
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    (tmp / "ov2_suite.json").write_text(json.dumps({"task": name, "n": n, "seed": seed, "image_size": size,
                                                    "chance": spec.chance, "primary": spec.primary}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process built the same folder meanwhile (same arguments, same bytes)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def has_data(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "dataset_dict.json").is_file() and (folder / "test").is_dir()


def ensure_data(names: list[str], data_dir: str | Path, n: int | None = None, progress: bool = True) -> dict:
    """{task: folder} for built-in tasks, building those whose folder is missing."""
    from tqdm import tqdm

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    missing = [name for name in names if not has_data(data_dir / name)]
    for name in tqdm(missing, desc="suite data", disable=not progress or not missing):
        build_task(name, data_dir / name, n=n)
    for name in names:
        out[name] = data_dir / name
    return out
