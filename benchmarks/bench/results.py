"""Writing a cost benchmark's result files: NAME.csv (one row per record) and NAME.md, never over a user's file."""

from __future__ import annotations

import csv
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


class OutputExists(ValueError):
    """A result file is already there and --force was not given."""


def result_paths(out_dir: str, name: str) -> list[str]:
    return [os.path.join(out_dir, f"{name}.csv"), os.path.join(out_dir, f"{name}.md")]


def check_writable(out_dir: str, name: str, force: bool) -> None:
    """Raise OutputExists before any work when a result file exists and --force was not given."""
    existing = [p for p in result_paths(out_dir, name) if os.path.exists(p)]
    if existing and not force:
        raise OutputExists(f"{existing[0]} exists: pass --force to overwrite it, or --out DIR to write elsewhere")


def write_results(out_dir: str, name: str, rows: list[dict], markdown: str, force: bool) -> list[str]:
    """Write NAME.csv (columns = the union of the rows' keys, in first-seen order) and NAME.md; returns the paths."""
    check_writable(out_dir, name, force)
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = result_paths(out_dir, name)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    for path, write in ((csv_path, lambda f: _write_csv(f, columns, rows)), (md_path, lambda f: f.write(markdown))):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    return [csv_path, md_path]


def _write_csv(f, columns: list[str], rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
