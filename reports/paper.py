"""The paper's tables beside ours (reports/reference/<name>.csv, named by `paper:` in experiment.yaml).

Our encoders map to the paper's methods by family (ov2 -> OpenVision 2, ov1 -> OpenVision, clip -> OpenAI-CLIP);
for each, the paper's difference from OpenVision 2 (LLaVA-1.5 rows, mean over the settings both report) is set
beside ours, with whether the two point the same way: the scale and data differ, the ordering may not.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.evals.suite.tasks import TASKS
from reports import collect
from reports.tables import table

PAPER_METHODS = {"ov2": "OpenVision 2", "ov1": "OpenVision", "clip": "OpenAI-CLIP"}


def family(run: dict, enc: str) -> str:
    for text in (run["families"].get(enc, ""), enc):
        head = str(text).lower().split("-")[0]
        if head in PAPER_METHODS:
            return head
    return ""


def paper_section(run: dict, summary: dict) -> dict | None:
    """The paper table, and for each of our encoders the paper's difference from OpenVision 2 beside ours."""
    name = run["experiment"].get("paper")
    paper = collect.load_paper(name)
    if paper is None:
        return {"name": name, "missing": True, "table": None, "pairs": []} if name else None
    cols = [c for c in ("framework", "method", "encoder", "resolution") if c in paper.columns]
    ours_cols = [(col["label"], _column(col["task"])) for col in summary["columns"]]
    metric_cols = [c for _, c in ours_cols if c and c in paper.columns]
    labels = {c: lab for lab, c in ours_cols if c}
    shown = paper[cols + metric_cols].rename(columns=labels)
    return {"name": name, "missing": False, "table": table(shown, digits=1), "pairs": _paper_pairs(run, summary, paper)}


def _paper_pairs(run: dict, summary: dict, paper: pd.DataFrame) -> list[dict]:
    ref = summary["reference"]
    if "method" not in paper.columns or not ref or family(run, ref) not in PAPER_METHODS:
        return []
    if "framework" in paper.columns and (paper["framework"] == "llava-1.5").any():
        paper = paper[paper["framework"] == "llava-1.5"]  # the recipe our bridge follows
    keys = [c for c in ("encoder", "resolution") if c in paper.columns]
    ref_rows = paper[paper["method"] == PAPER_METHODS[family(run, ref)]]
    out = []
    for row in summary["rows"]:
        method = PAPER_METHODS.get(family(run, row["encoder"]))
        if row["reference"] or row["missing"] or not method:
            continue
        both = paper[paper["method"] == method].merge(ref_rows, on=keys, suffixes=("", "_ref"))
        if both.empty:
            continue
        lines = []
        for j, col in enumerate(summary["columns"]):
            pcol = _column(col["task"])
            mine = row["cells"][j]["value"]
            base = next(r["cells"][j]["value"] for r in summary["rows"] if r["reference"])
            if pcol not in paper.columns or mine is None or base is None:
                continue
            scale = 100.0 if col["percent"] else 1.0
            ours = (mine - base) * scale
            theirs = float((both[pcol] - both[f"{pcol}_ref"]).mean())
            agree = "—" if abs(ours) < 1e-9 or abs(theirs) < 1e-9 else ("yes" if (ours > 0) == (theirs > 0) else "no")
            lines.append({"task": col["label"], "ours": f"{ours:+.1f}", "paper": f"{theirs:+.1f}", "agree": agree})
        configs = ", ".join(f"{r.encoder} {r.resolution}" if "resolution" in keys else str(r.encoder)
                            for r in both[keys].itertuples(index=False))
        out.append({"encoder": row["encoder"], "method": method, "reference": ref,
                    "reference_method": PAPER_METHODS[family(run, ref)], "configs": configs, "lines": lines})
    return out


def paper_efficiency(reference_dir: Path) -> list[dict]:
    """OpenVision 2 / OpenVision ratios from the paper's efficiency table (reports/reference/efficiency.csv)."""
    try:
        eff = pd.read_csv(Path(reference_dir) / "efficiency.csv")
    except (OSError, ValueError):
        return []
    out = []
    for (_, enc, res, batch), group in eff.groupby(["table", "encoder", "resolution", "batch"], dropna=False,
                                                 sort=False):
        pair = group.set_index("method")
        if not {"OpenVision", "OpenVision 2"} <= set(pair.index):
            continue
        for col, what in (("train_hours", "training time"), ("gflops_per_image", "FLOPs per image"),
                          ("peak_mem_gb", "peak memory per chip")):
            a, b = pair.loc["OpenVision 2", col], pair.loc["OpenVision", col]
            if pd.notna(a) and pd.notna(b) and b:
                setting = f"{enc}, {res:.0f} px" + (f", batch {batch:.0f}" if pd.notna(batch) else "")
                out.append({"what": what, "setting": setting, "ratio": f"{a / b:.2f}"})
    return out


def _column(task: str) -> str | None:
    """The paper table's column a built-in task stands for (None for other tasks)."""
    spec = TASKS.get(task)
    return spec.column if spec else None
