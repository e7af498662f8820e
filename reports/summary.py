"""The summary: encoders x tasks in the paper's style, the paired differences from the reference encoder, one sentence.

A column is shown in % when all its values (and its chance) lie in [0, 1] (accuracies), else as a score with one
decimal (MME). The reference row is OpenVision 2 (the encoder named or preset `ov2...`; else the first encoder).
Differences come from the per-question scores (reports/stats.py), in percentage points of questions.
"""

from __future__ import annotations

import math

import pandas as pd

from benchmarks.evals.suite.tasks import TASKS
from reports.collect import BRIDGE_MEASURES, ENCODER_TASKS
from reports.stats import paired_differences


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def task_label(task: str) -> str:
    return TASKS[task].label if task in TASKS else task


def reference_encoder(run: dict) -> str | None:
    roles = run.get("roles") or {}
    encoders = [e for e in run["encoders"] if roles.get(e, "encoder") != "control"]
    for name in encoders:
        if name.lower().startswith("ov2") or run["families"].get(name, "").lower().startswith("ov2"):
            return name
    return encoders[0] if encoders else None


def primary_rows(run: dict) -> pd.DataFrame:
    """One row per (encoder, task) of the LLaVA tasks: the primary metric, averaged over seeds (one pass over the
    table, so that 100 encoders x 100 tasks take a fraction of a second)."""
    res = run["results"]
    res = res[~res["task"].isin([*ENCODER_TASKS, *BRIDGE_MEASURES])]
    if res.empty:
        return res.assign(percent=[])
    key = ["encoder", "task"]
    metric = res.drop_duplicates(key).set_index(key)["metric"]  # each group's first metric ...
    flagged = res[res["primary"] == True].drop_duplicates(key).set_index(key)["metric"]  # noqa: E712
    metric.update(flagged)  # ... unless the results table flags its primary
    present = set(zip(res["encoder"], res["task"], res["metric"]))
    for enc, task in metric.index.difference(flagged.index):  # else the one the evaluation's scores.json names
        primary = ((run["scores"].get(enc) or {}).get("tasks") or {}).get(task, {}).get("primary")
        if (enc, task, primary) in present:
            metric[(enc, task)] = primary
    rows = res.merge(metric.rename("chosen").reset_index(), on=key)
    rows = rows[rows["metric"] == rows["chosen"]]
    out = rows.groupby(key, sort=False).agg(metric=("metric", "first"), value=("value", "mean"),
                                             stderr_one=("stderr", "mean"), spread=("value", "std"),
                                             chance=("chance", "mean"), n=("n", "max"), seeds=("value", "size"))
    out["stderr"] = out["stderr_one"].where(out["seeds"] <= 1, out["spread"] / out["seeds"].clip(lower=1) ** 0.5)
    order = pd.MultiIndex.from_frame(res[key].drop_duplicates())  # the table's own order of (encoder, task)
    out = out.reindex(order).reset_index()
    return out[["encoder", "task", "metric", "value", "stderr", "chance", "n", "seeds"]]


def _fmt(x: float | None, percent: bool, sign: bool = False) -> str:
    if x is None:
        return "—"
    x = x * 100 if percent else x
    return f"{x:+.1f}" if sign else f"{x:.1f}"


def build_summary(run: dict) -> dict:
    """Columns, rows (cells with display text and flags), the chance row, the differences, and a sentence."""
    prim = primary_rows(run)
    order = [t for t in TASKS if t in set(prim.get("task", []))]
    tasks = order + [t for t in dict.fromkeys(prim.get("task", [])) if t not in order]
    # every encoder of the run gets a row: one whose bridge failed shows dashes rather than vanishing
    encoders = list(run["encoders"]) + [e for e in dict.fromkeys(prim.get("encoder", [])) if e not in run["encoders"]]
    ref = reference_encoder(run)
    columns = []
    by_task = dict(tuple(prim.groupby("task", sort=False))) if len(prim) else {}
    for task in tasks:
        col = by_task[task]
        values = [v for v in list(col["value"]) + list(col["chance"]) if _num(v) is not None]
        percent = all(0.0 <= v <= 1.0 for v in values)
        present = col["value"].dropna()
        # the best is marked only where it stands out: a column where every encoder ties marks none
        best = present.max() if present.nunique() > 1 or (len(present) == 1 and len(run["encoders"]) == 1) else None
        chance = _num(col["chance"].dropna().iloc[0]) if col["chance"].notna().any() else None
        columns.append({"task": task, "label": task_label(task), "percent": percent, "metric": col["metric"].iloc[0],
                        "unit": "%" if percent else "score", "best": best, "chance": chance,
                        "chance_text": _fmt(chance, percent), "n": _num(col["n"].max()),
                        "split": "held-in" if task in run.get("held_in", ()) else "held-out"})

    diffs = paired_differences(run["samples"], ref) if ref else pd.DataFrame()
    cell_of = {(r.encoder, r.task): r for r in prim.itertuples(index=False)}
    diff_of = {(r["encoder"], r["task"]): r for _, r in diffs.iterrows()} if len(diffs) else {}
    rows = []
    for enc in encoders:
        cells = []
        for column in columns:
            hit = cell_of.get((enc, column["task"]))
            value = _num(hit.value) if hit is not None else None
            stderr = _num(hit.stderr) if hit is not None else None
            cell = {"value": value, "stderr": stderr, "text": _fmt(value, column["percent"]),
                    "stderr_text": _fmt(stderr, column["percent"]) if stderr is not None else "",
                    "best": value is not None and column["best"] is not None and value == column["best"]}
            r = diff_of.get((enc, column["task"]))
            if enc != ref and r is not None and r["n"] > 0:
                cell["diff"] = {"text": f"{r['diff'] * 100:+.1f}", "lo": f"{r['lo'] * 100:+.1f}",
                                "hi": f"{r['hi'] * 100:+.1f}", "n": int(r["n"]), "significant": bool(r["significant"]),
                                "sign": "up" if r["diff"] > 0 else "down"}
            cells.append(cell)
        rows.append({"encoder": enc, "reference": enc == ref, "cells": cells,
                     "control": (run.get("roles") or {}).get(enc) == "control"})
    scores = [c["label"] for c in columns if not c["percent"]]
    note = (f"{_names(scores)} as {'a score' if len(scores) == 1 else 'scores'}, the rest in %" if scores
            else "All in %")
    return {"columns": columns, "rows": rows, "reference": ref, "diffs": diffs, "unit_note": note,
            "sentence": _sentence(rows, columns, ref, run)}


def _sentence(rows: list[dict], columns: list[dict], ref: str | None, run: dict) -> str:
    """What the run shows, in words: who leads, and which differences from the reference are real."""
    if not rows or not columns:
        return "No evaluation results were found in this run folder."
    rows = [r for r in rows if not r.get("control")] or rows  # controls are read against in reports/controls.py
    wins = {r["encoder"]: sum(c["best"] for c in r["cells"]) for r in rows}
    leader = max(wins, key=wins.get)
    if wins[leader]:
        text = f"{leader} has the best score on {wins[leader]} of {len(columns)} tasks."
    else:
        text = "No encoder scores above the others on any task."
    for r in rows:
        diffs = [(col["label"], c["diff"]) for col, c in zip(columns, r["cells"]) if "diff" in c]
        if r["reference"] or not diffs:
            continue
        up = [label for label, d in diffs if d["significant"] and d["sign"] == "up"]
        down = [label for label, d in diffs if d["significant"] and d["sign"] == "down"]
        said = [f"better on {_names(up)}"] if up else []
        said += [f"worse on {_names(down)}"] if down else []
        noise = len(diffs) - len(up) - len(down)
        said += [f"within noise on {'all' if noise == len(diffs) else noise} of {len(diffs)} tasks"] if noise else []
        text += f" Against {ref}, {r['encoder']} is {', '.join(said)}."
    text += " (Real = the 95% paired-bootstrap interval over the same questions excludes zero.)"
    held_in = [c["label"] for c in columns if c["split"] == "held-in"]
    if held_in:
        text += (f" Held-in: {_names(held_in)} (their train split is in the bridge's stage-2 mix, as GQA's is in "
                 f"LLaVA-1.5's; the test questions are unseen); the other tasks are held-out.")
    status = run["status"]
    broken = sorted(set(status.loc[status["state"].isin(["failed", "interrupted"]), "encoder"]))
    if broken:
        text += f" Stages failed for {', '.join(broken)}: see Failures."
    return text


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def build_comparison(a: dict, b: dict) -> dict:
    """Two runs side by side: per encoder, run A's row, run B's row, and B - A in the table's unit with a 95% paired
    bootstrap over the questions both runs answered (same doc_id), in percentage points of questions."""
    from reports.stats import paired_bootstrap

    sa, sb = build_summary(a), build_summary(b)
    columns = sa["columns"] + [c for c in sb["columns"] if c["task"] not in {x["task"] for x in sa["columns"]}]
    rows = []
    for enc in list(dict.fromkeys([r["encoder"] for r in sa["rows"]] + [r["encoder"] for r in sb["rows"]])):
        cells = {}
        for side, summ in (("a", sa), ("b", sb)):
            row = next((r for r in summ["rows"] if r["encoder"] == enc), None)
            index = {c["task"]: i for i, c in enumerate(summ["columns"])}
            cells[side] = [row["cells"][index[c["task"]]] if row is not None and c["task"] in index else None
                           for c in columns]
        diffs = []
        for col, ca, cb in zip(columns, cells["a"], cells["b"]):
            if not ca or not cb or ca["value"] is None or cb["value"] is None:
                diffs.append(None)
                continue
            scale = 100.0 if col["percent"] else 1.0
            d = {"text": f"{(cb['value'] - ca['value']) * scale:+.1f}", "ci": "", "significant": False,
                 "sign": "up" if cb["value"] > ca["value"] else "down"}
            pick = [s[(s["encoder"] == enc) & (s["task"] == col["task"])][["doc_id", "score"]]
                    for s in (a["samples"], b["samples"])]
            both = pick[0].merge(pick[1], on="doc_id").dropna()
            if len(both):
                r = paired_bootstrap(both["score_x"], both["score_y"])
                d.update(ci=f"[{r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]", significant=r["significant"], n=r["n"])
            diffs.append(d)
        rows.append({"encoder": enc, "a": [c["text"] if c else "—" for c in cells["a"]],
                     "b": [c["text"] if c else "—" for c in cells["b"]], "diff": diffs})
    label_a, label_b = a["name"], b["name"]
    if label_a == label_b:
        label_a, label_b = a["dir"].name, b["dir"].name
    return {"a": label_a, "b": label_b, "a_dir": str(a["dir"]), "b_dir": str(b["dir"]), "columns": columns,
            "rows": rows}
