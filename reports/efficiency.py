"""The efficiency section: the cost benchmark's tables (benchmarks/results/cost_*.csv) with ratios to OpenVision 2,
the paper's OV2 / OV1 ratios beside them, and the kernel benchmark's markdown table.

Cost files differ by benchmark (`ov2 bench train`: variant, step_s, images_per_s, peak_mib; `ov2 bench flops`:
family, preset, gflops, paper_gflops); known identifier and measure columns are shown, unknown ones left out.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports import collect
from reports.paper import paper_efficiency
from reports.tables import table

IDENTIFIERS = ("variant", "family", "preset", "image_size", "batch", "keep_ratio", "text_passes", "counting")
MEASURES = ("gflops", "paper_gflops", "step_s", "step_time_s", "images_per_s", "peak_mib", "peak_mem_mb", "net_mib",
            "ms_per_sample", "vs_both", "paper_hours", "paper_vs_both")  # the last four: recipe estimates


def cost_table(cost: pd.DataFrame, reference_family: str) -> pd.DataFrame:
    """One cost_*.csv with `measure / ref` columns: each row divided by the reference family's first row that shares
    its preset, image size and batch (whichever of those the file has)."""
    ids = [c for c in IDENTIFIERS if c in cost.columns]
    measures = [c for c in MEASURES if c in cost.columns and pd.api.types.is_numeric_dtype(cost[c])]
    shown = cost[ids + measures].copy()
    if "family" not in cost.columns:
        return shown
    keys = [c for c in ("preset", "image_size", "batch") if c in cost.columns]
    for m in measures:
        ratios = []
        for _, row in cost.iterrows():
            same = cost[(cost["family"].astype(str) == reference_family) & cost[m].notna()]
            for k in keys:
                same = same[same[k] == row[k]]
            base = float(same[m].iloc[0]) if len(same) else float("nan")
            ratios.append(row[m] / base if base and pd.notna(row[m]) else float("nan"))
        if any(pd.notna(r) for r in ratios):
            shown[f"{m} / {reference_family}"] = ratios
    return shown


def efficiency(reference_family: str, results_dir: Path) -> dict | None:
    kernels = collect.load_markdown_tables(results_dir / "kernels_cpu.md")
    costs = []
    for path in sorted(results_dir.glob("cost_*.csv")):
        try:
            cost = pd.read_csv(path)
            # `bench train` appends recipe estimates (no family, other measures): a table of their own
            parts = [cost]
            if "family" in cost.columns:
                parts = [cost[cost["family"].notna()], cost[cost["family"].isna()]]
            for name, part in zip((path.stem, f"{path.stem}: recipe estimates"), parts):
                shown = cost_table(part, reference_family).dropna(axis=1, how="all")
                costs.append({"name": name, "table": table(shown) if len(part) else None})
        except (OSError, ValueError, KeyError):
            continue
    out = {"cost": [c for c in costs if c["table"]], "paper": paper_efficiency(collect.REFERENCE_DIR),
           "kernels": [{"text": b.get("text"), "heading": b.get("heading"), "table": table(b.get("table"))}
                       for b in kernels], "reference": reference_family}
    return out if out["cost"] or out["paper"] or any(b["table"] for b in out["kernels"]) else None
