"""Run folder(s) -> one self-contained HTML file: jinja2 (autoescape on) over reports/templates/report.html.j2.

    build_report(run_dir, out=None, compare=None) -> Path     # RUN/report/index.html by default

Everything is read from disk (reports/collect.py); plots are data URIs (reports/figures.py); the only script is the
template's few inline lines that sort tables. Every string from the run folder goes through autoescape; the one
`|safe`-free path for markup is the template itself.
"""

from __future__ import annotations

import html
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pandas as pd

from reports import collect, figures
from reports.examples import build_examples
from reports.summary import build_comparison, build_summary, task_label

TEMPLATES = Path(__file__).with_name("templates")
GENERATOR = "ov2 report"


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def table(df: pd.DataFrame | None, digits: int = 2) -> dict | None:
    """A DataFrame as {"columns": [...], "rows": [[text...]], "numeric": [bool...]} for the template."""
    if df is None or df.empty:
        return None
    df = df.copy()
    for c in df.columns:  # numbers parsed from text (markdown tables) count as numbers when all of them parse
        if df[c].dtype == object:
            parsed = pd.to_numeric(df[c], errors="coerce")
            if parsed.notna().all():
                df[c] = parsed
    # right-align a column when most of it is numbers (a markdown table's "not run" rows stay text)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) or pd.to_numeric(df[c], errors="coerce").notna().mean() > 0.6
               for c in df.columns]
    rows = [[_fmt(v, digits) if not (isinstance(v, float) and v.is_integer() and abs(v) > 1000) else f"{v:,.0f}"
             for v in row] for row in df.itertuples(index=False)]
    return {"columns": [str(c) for c in df.columns], "rows": rows, "numeric": numeric}


def _task_charts(summary: dict, colour: dict) -> list[dict]:
    charts = []
    for i, col in enumerate(summary["columns"]):
        bars = [{"encoder": r["encoder"], "value": r["cells"][i]["value"], "stderr": r["cells"][i]["stderr"]}
                for r in summary["rows"]]
        scale = 100.0 if col["percent"] else 1.0
        bars = [{**b, "value": None if b["value"] is None else b["value"] * scale,
                 "stderr": None if b["stderr"] is None else b["stderr"] * scale} for b in bars]
        chance = None if col["chance"] is None else col["chance"] * scale
        charts.append({"label": col["label"], "uri": figures.task_chart(col["label"], bars, chance, col["unit"],
                                                                         colour)})
    return charts


def _curves(run: dict, colour: dict) -> list[dict]:
    out = []
    for label in collect.CURVES:
        part = run["curves"][run["curves"]["curve"] == label]
        if len(part):
            out.append({"label": label, "uri": figures.curve_chart(label, part, colour)})
    return out


def _encoder_eval(run: dict, colour: dict) -> dict | None:
    res = run["results"]
    res = res[res["task"].isin(list(collect.ENCODER_TASKS))]
    values = {}
    for enc in run["encoders"]:
        rows = res[res["encoder"] == enc]
        got = {t: rows.loc[rows["task"] == t, "value"].mean() for t in collect.ENCODER_TASKS}
        disk = run["encoder_eval"].get(enc, {})
        fallback = {"fmnist_probe": "linear_probe_acc", "fmnist_zeroshot": "zero_shot_acc",
                    "fmnist_probe_init": "random_init_linear_probe_acc"}
        for task, key in fallback.items():
            if (got[task] is None or pd.isna(got[task])) and isinstance(disk.get(key), int | float):
                got[task] = float(disk[key])
        if any(pd.notna(v) for v in got.values()):
            values[enc] = {t: (None if pd.isna(v) else float(v)) for t, v in got.items()}
    if not values:
        return None
    chance = res["chance"].dropna()
    chance = float(chance.iloc[0]) if len(chance) else 0.1
    rows = [{"encoder": enc, "cells": [_pct(v[t]) for t in collect.ENCODER_TASKS],
             "method": run["encoder_eval"].get(enc, {}).get("zero_shot_method", "")} for enc, v in values.items()]
    series = {enc: [None if v[t] is None else v[t] * 100 for t in ("fmnist_probe", "fmnist_zeroshot")]
              for enc, v in values.items()}
    floor = [v["fmnist_probe_init"] for v in values.values() if v["fmnist_probe_init"] is not None]
    uri = figures.grouped_chart("Fashion-MNIST", ["linear probe", "zero-shot"], series, colour,
                                floor=max(floor) * 100 if floor else chance * 100,
                                floor_label="random-init probe" if floor else "chance")
    return {"columns": list(collect.ENCODER_TASKS.values()), "rows": rows, "chance": _pct(chance), "uri": uri}


def _pct(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{100 * float(x):.1f}"


IDENTIFIERS = ("variant", "family", "preset", "image_size", "batch", "keep_ratio", "text_passes", "counting")
MEASURES = ("gflops", "paper_gflops", "step_s", "step_time_s", "images_per_s", "peak_mib", "peak_mem_mb", "net_mib")


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


def _efficiency(reference_family: str, results_dir: Path) -> dict | None:
    kernels = collect.load_markdown_tables(results_dir / "kernels_cpu.md")
    costs = []
    for path in sorted(results_dir.glob("cost_*.csv")):
        try:
            costs.append({"name": path.stem, "table": table(cost_table(pd.read_csv(path), reference_family))})
        except (OSError, ValueError, KeyError):
            continue
    out = {"cost": [c for c in costs if c["table"]], "paper": _paper_efficiency(collect.REFERENCE_DIR),
           "kernels": [{"text": b.get("text"), "heading": b.get("heading"), "table": table(b.get("table"))}
                       for b in kernels], "reference": reference_family}
    return out if out["cost"] or out["paper"] or any(b["table"] for b in out["kernels"]) else None


PAPER_METHODS = {"ov2": "OpenVision 2", "ov1": "OpenVision", "clip": "OpenAI-CLIP"}


def _family(run: dict, enc: str) -> str:
    for text in (collect.encoder_family(run["experiment"], enc), enc):
        head = str(text).lower().split("-")[0]
        if head in PAPER_METHODS:
            return head
    return ""


def _paper(run: dict, summary: dict) -> dict | None:
    """The paper table, and for each of our encoders the paper's difference from OpenVision 2 beside ours."""
    name = run["experiment"].get("paper")
    paper = collect.load_paper(name)
    if paper is None:
        return {"name": name, "missing": True, "table": None, "pairs": []} if name else None
    cols = [c for c in ("framework", "method", "encoder", "resolution") if c in paper.columns]
    ours_cols = [(col["label"], collect.TASKS.get(col["task"], (None, None))[1]) for col in summary["columns"]]
    metric_cols = [c for _, c in ours_cols if c and c in paper.columns]
    labels = {c: lab for lab, c in ours_cols if c}
    shown = paper[cols + metric_cols].rename(columns=labels)
    return {"name": name, "missing": False, "table": table(shown, digits=1), "pairs": _paper_pairs(run, summary, paper)}


def _paper_pairs(run: dict, summary: dict, paper: pd.DataFrame) -> list[dict]:
    ref = summary["reference"]
    if "method" not in paper.columns or not ref or _family(run, ref) not in PAPER_METHODS:
        return []
    if "framework" in paper.columns and (paper["framework"] == "llava-1.5").any():
        paper = paper[paper["framework"] == "llava-1.5"]  # the recipe our bridge follows
    keys = [c for c in ("encoder", "resolution") if c in paper.columns]
    ref_rows = paper[paper["method"] == PAPER_METHODS[_family(run, ref)]]
    out = []
    for row in summary["rows"]:
        method = PAPER_METHODS.get(_family(run, row["encoder"]))
        if row["reference"] or row["missing"] or not method:
            continue
        both = paper[paper["method"] == method].merge(ref_rows, on=keys, suffixes=("", "_ref"))
        if both.empty:
            continue
        lines = []
        for j, col in enumerate(summary["columns"]):
            pcol = collect.TASKS.get(col["task"], (None, None))[1]
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
                    "reference_method": PAPER_METHODS[_family(run, ref)], "configs": configs, "lines": lines})
    return out


def _paper_efficiency(reference_dir: Path) -> list[dict]:
    """OpenVision 2 / OpenVision ratios from the paper's efficiency table (benchmarks/reference/efficiency.csv)."""
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


def _failures(run: dict) -> list[dict]:
    st = run["status"]
    bad = st[st["state"].isin(["failed", "interrupted", "skipped", "running"])]
    out = [{"encoder": r.encoder, "stage": r.stage, "state": r.state, "error": r.error or ""}
           for r in bad.itertuples(index=False)]
    for enc, scores in run["scores"].items():
        for task, info in (scores.get("tasks") or {}).items():
            if isinstance(info, dict) and info.get("status") == "failed":
                out.append({"encoder": enc, "stage": f"eval: {task}", "state": "failed", "error": info.get("error")})
    return out


def _provenance(run: dict) -> dict:
    prov = run["provenance"]
    flat = {k: v for k, v in prov.items() if not isinstance(v, dict | list)}
    nested = {k: v for k, v in prov.items() if isinstance(v, dict)}
    argv = prov.get("argv")
    stages = [{"encoder": r.encoder, "stage": r.stage, "state": r.state, "started": r.started or "",
               "finished": r.finished or "", "wall_s": _fmt(r.wall_s, 1), "peak": _fmt(r.peak_rss_mb, 0),
               "key": r.key or ""} for r in run["status"].itertuples(index=False)]
    configs = [{"encoder": enc, "name": name, "text": text} for (enc, name), text in run["configs"].items()]
    experiment = (run["dir"] / "experiment.yaml")
    return {"flat": flat, "nested": nested, "argv": " ".join(map(str, argv)) if isinstance(argv, list) else argv,
            "stages": stages, "configs": configs,
            "experiment": experiment.read_text(errors="replace") if experiment.is_file() else ""}


def _missing_reason(run: dict, enc: str) -> str:
    st = run["status"]
    rows = st[(st["encoder"] == enc) & st["state"].isin(["failed", "skipped", "interrupted"])]
    for r in rows.itertuples(index=False):
        if r.state != "skipped":
            return f"{r.stage} {r.state}"
    return "no results"


def context(run_dir: Path, compare: Path | None = None, results_dir: Path | None = None) -> dict:
    run = collect.load_run(run_dir)
    summary = build_summary(run)
    for row in summary["rows"]:
        row["missing"] = _missing_reason(run, row["encoder"]) if all(c["value"] is None for c in row["cells"]) else ""
    colour = figures.colours(run["encoders"])
    ref = summary["reference"] or ""
    ctx = {
        "title": f"ov2 report: {run['name']}", "run": run, "summary": summary, "colour": colour,
        "charts": _task_charts(summary, colour),
        "examples": build_examples(run["samples"], run["encoders"], run["data_dir"]),
        "curves": _curves(run, colour), "encoder_eval": _encoder_eval(run, colour),
        "efficiency": _efficiency(_family(run, ref) or "ov2", Path(results_dir or collect.RESULTS_DIR)),
        "paper": _paper(run, summary), "failures": _failures(run), "provenance": _provenance(run),
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "generator": GENERATOR,
    }
    if compare is not None:
        other = collect.load_run(compare)
        ctx["compare"] = build_comparison(run, other)
        ctx["compare"]["provenance"] = _provenance(other)
        ctx["title"] = f"ov2 report: {run['name']} vs {other['name']}"
    return ctx


def render(ctx: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["label"] = task_label
    return env.get_template("report.html.j2").render(**ctx)


class ReportError(ValueError):
    """Bad input for a report (no run folder, nothing in it, or an output that is not ours without force)."""


def default_out(run_dir: Path, compare: Path | None) -> Path:
    name = "index.html" if compare is None else f"compare_{Path(compare).resolve().name}.html"
    return Path(run_dir) / "report" / name


def is_ours(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:2000]
    except OSError:
        return False
    return f'<meta name="generator" content="{html.escape(GENERATOR)}">' in head


def build_report(run_dir, out=None, compare=None, force: bool = False, results_dir=None) -> Path:
    """Write the report of `run_dir` (beside `compare` when given) and return its path.

    results_dir: where the cost and kernel benchmark results are (default benchmarks/results/).
    A report this tool wrote before is replaced; any other existing file only with force=True."""
    run_dir = Path(run_dir)
    for folder in [run_dir] + ([Path(compare)] if compare is not None else []):
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a run folder")
        if not any((folder / f).exists() for f in ("results.csv", "results.parquet", "encoders", "experiment.yaml")):
            raise ReportError(f"{folder} has no results.csv, results.parquet, encoders/ or experiment.yaml")
    out = Path(out) if out is not None else default_out(run_dir, compare)
    if out.is_dir():
        raise ReportError(f"--out {out} is a folder; give a file name")
    if out.exists() and not force and not is_ours(out):
        raise ReportError(f"{out} exists and is not an ov2 report; pass --force to replace it")
    start = time.perf_counter()
    text = render(context(run_dir, Path(compare) if compare is not None else None, results_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    build_report.last_seconds = time.perf_counter() - start
    return out
