"""Run folder(s) -> one self-contained HTML file: jinja2 (autoescape on) over reports/templates/report.html.j2.

    build_report(run_dir, out=None, compare=None) -> Path     # RUN/report/index.html by default

Sections: summary (reports/summary.py, paired bootstrap in reports/stats.py), per-task charts and curves
(reports/figures.py), examples (reports/examples.py), encoder evaluation, efficiency (reports/efficiency.py), the
paper (reports/paper.py), failures, provenance. Everything is read from disk (reports/collect.py); plots are data
URIs; the only script is the template's few inline lines (table sorting, the contents list's current section).
Every string from the run folder goes through autoescape: no template uses `|safe`, and charts are <img> data URIs,
so neither a name nor an answer can become markup.
"""

from __future__ import annotations

import html
import time
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pandas as pd

from reports import collect, figures
from reports.controls import caption_losses, controls_section
from reports.efficiency import efficiency
from reports.examples import build_examples
from reports.headline import build_headline
from reports.paper import family, paper_section
from reports.summary import build_comparison, build_summary, task_label
from reports.tables import fmt

TEMPLATES = Path(__file__).with_name("templates")
GENERATOR = "ov2 report"


MAX_CHARTS, MAX_BARS = 24, 40  # per-task charts: at most this many tasks, each with at most this many encoders


def _charts_note(summary: dict) -> str:
    tasks, encoders = len(summary["columns"]), len(summary["rows"])
    if encoders > MAX_BARS:
        return f"No per-task charts for {encoders} encoders (at most {MAX_BARS}): the table above holds every value."
    if tasks > MAX_CHARTS:
        return f"Charts of the first {MAX_CHARTS} of {tasks} tasks; the table above holds every value."
    return ""


def _task_charts(summary: dict, colour: dict) -> list[dict]:
    """One bar chart per task (each takes a matplotlib figure: capped by MAX_CHARTS and MAX_BARS, see _charts_note)."""
    charts = []
    if len(summary["rows"]) > MAX_BARS:
        return charts
    for i, col in enumerate(summary["columns"][:MAX_CHARTS]):
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


def _text(x) -> str:
    """A string field of a status table ('' for None or NaN)."""
    return x if isinstance(x, str) else ""


def _failures(run: dict) -> list[dict]:
    st = run["status"]
    bad = st[st["state"].isin(["failed", "interrupted", "skipped", "running"])]
    out = [{"encoder": r.encoder, "stage": r.stage, "state": r.state, "error": _text(r.error), "log": _text(r.log)}
           for r in bad.itertuples(index=False)]
    for enc, scores in run["scores"].items():
        for task, info in (scores.get("tasks") or {}).items():
            if isinstance(info, dict) and info.get("status") == "failed":
                out.append({"encoder": enc, "stage": f"eval: {task}", "state": "failed", "error": info.get("error"),
                            "log": ""})
    return out


def _provenance(run: dict) -> dict:
    prov = run["provenance"]
    flat = {k: "—" if v is None else v for k, v in prov.items() if not isinstance(v, dict | list)}
    nested = {k: v for k, v in prov.items() if isinstance(v, dict)}
    argv = prov.get("argv")
    stages = [{"encoder": r.encoder, "stage": r.stage, "state": r.state, "started": _text(r.started),
               "finished": _text(r.finished), "wall_s": fmt(r.wall_s, 1), "peak": fmt(r.peak_rss_mb, 0),
               "key": _text(r.key), "command": _text(r.command)} for r in run["status"].itertuples(index=False)]
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
        "charts": _task_charts(summary, colour), "charts_note": _charts_note(summary),
        "examples": build_examples(run["samples"], run["encoders"], run["data_dir"]),
        "curves": _curves(run, colour), "encoder_eval": _encoder_eval(run, colour),
        "efficiency": efficiency(family(run, ref) or "ov2", Path(results_dir or collect.RESULTS_DIR)),
        "paper": paper_section(run, summary), "failures": _failures(run), "provenance": _provenance(run),
        "headline": build_headline(run, {c["task"]: c["label"] for c in summary["columns"]}),
        "caption_losses": caption_losses(run),
        "controls": controls_section(run, [c["task"] for c in summary["columns"]],
                                     {c["task"]: c["label"] for c in summary["columns"]}),
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "generator": GENERATOR,
    }
    head, controls = ctx["headline"], ctx["controls"]
    if head and controls and controls["none_clear"]:
        head["answer"] = ("Not at this budget: no encoder beats the blind control on any task (the LLM does not use "
                          "the image), so the differences below are noise, not a ranking. " + head["answer"])
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


class ReportError(collect.BadRunFolder):
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
