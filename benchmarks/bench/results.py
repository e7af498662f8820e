"""The one writer of every `ov2 bench` result: NAME.md (the table a person reads) beside NAME.csv (one row per
record) and/or NAME.json ({"meta": ..., "rows": [...]}), written atomically, never over a user's file without
--force. Default folder: benchmarks/results/ (small files only).
"""

from __future__ import annotations

import csv
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


class OutputExists(ValueError):
    """A result file is already there and --force was not given."""


def out_options(parser, name: str) -> None:
    """--out NAME (default benchmarks/results/NAME) and --force: the options of a benchmark that writes NAME.md."""
    parser.add_argument("--out", default=os.path.join(RESULTS, name), help="NAME: writes NAME.md, NAME.json")
    parser.add_argument("--force", action="store_true", help="replace existing NAME.md / NAME.json")


def result_paths(out_dir: str, name: str, formats: tuple[str, ...] = ("csv", "md")) -> list[str]:
    return [os.path.join(out_dir, f"{name}.{suffix}") for suffix in formats]


def check_writable(out_dir: str, name: str, force: bool, formats: tuple[str, ...] = ("csv", "md")) -> None:
    """Raise OutputExists before any work when a result file exists and --force was not given."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExists(f"{out_dir} is a file, not a folder")
    existing = [p for p in result_paths(out_dir, name, formats) if os.path.exists(p)]
    if existing and not force:
        raise OutputExists(f"{existing[0]} exists: pass --force to overwrite it, or --out to write elsewhere")


def write_results(out_dir: str, name: str, rows: list[dict], markdown: str, force: bool, *,
                  formats: tuple[str, ...] = ("csv", "md"), meta: dict | None = None) -> list[str]:
    """Write NAME.md and NAME.csv (columns = the union of the rows' keys, in first-seen order) and/or NAME.json
    (meta + rows); returns the paths."""
    check_writable(out_dir, name, force, formats)
    os.makedirs(out_dir or ".", exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    writers = {"csv": lambda f: _write_csv(f, columns, rows), "md": lambda f: f.write(markdown),
               "json": lambda f: f.write(json.dumps({"meta": meta or {}, "rows": rows}, indent=1) + "\n")}
    paths = result_paths(out_dir, name, formats)
    for path, suffix in zip(paths, formats):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            writers[suffix](f)
        os.replace(tmp, path)
    return paths


def _write_csv(f, columns: list[str], rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
