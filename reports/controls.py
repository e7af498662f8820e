"""What vision is worth: each encoder against the run's controls, task by task.

    blind        the same LLaVA recipe and evaluation with no image reaching the LLM: the floor an encoder must clear
    random-init  the encoder architecture at its initial weights, bridged the same way: what pretraining adds

Per (encoder, task): score(encoder) - score(control) over the same questions, with the 95% paired bootstrap interval
(reports/stats.py), in percentage points of questions answered right. A difference is real when its interval
excludes zero. A task on which no encoder is really above blind "does not need vision at this scale": its questions
are answered as well without the image.
"""

from __future__ import annotations

from benchmarks.runner.experiment import control_of
from reports.stats import paired_differences


def controls_section(run: dict, tasks: list[str], labels: dict[str, str]) -> dict | None:
    """The table (rows: tasks; per encoder a cell vs each control), the tasks that need vision, and a sentence.
    None when the run has no control with answers."""
    roles = run.get("roles") or {}
    samples = run["samples"]
    controls = [e for e in run["encoders"] if roles.get(e) == "control" and control_of(e)
                and (samples["encoder"] == e).any()]
    encoders = [e for e in run["encoders"] if roles.get(e, "encoder") != "control"]
    if not controls or not encoders:
        return None
    diffs = {c: paired_differences(samples[samples["encoder"].isin([*encoders, c])], reference=c) for c in controls}
    blind = next((c for c in controls if control_of(c) == "blind"), None)
    rows, needs_vision, cleared = [], [], {e: [] for e in encoders}
    for task in tasks:
        cells = []
        for enc in encoders:
            for control in controls:
                d = diffs[control]
                hit = d[(d["encoder"] == enc) & (d["task"] == task)] if len(d) else d
                if not len(hit) or hit["n"].iloc[0] == 0:
                    cells.append(None)
                    continue
                r = hit.iloc[0]
                up = bool(r["significant"]) and r["diff"] > 0
                cells.append({"text": f"{r['diff'] * 100:+.1f}", "ci": f"[{r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]",
                              "n": int(r["n"]), "significant": bool(r["significant"]), "up": up})
                if control == blind and up:
                    cleared[enc].append(task)
        beats_blind = any(task in cleared[e] for e in encoders)
        if blind is not None and beats_blind:
            needs_vision.append(task)
        rows.append({"task": task, "label": labels.get(task, task), "cells": cells,
                     "split": "held-in" if task in run.get("held_in", ()) else "held-out",
                     "no_vision": blind is not None and not beats_blind})
    header = [(enc, control) for enc in encoders for control in controls]
    return {"controls": controls, "encoders": encoders, "header": header, "rows": rows,
            "needs_vision": needs_vision, "cleared": cleared,
            "none_clear": blind is not None and bool(rows) and not needs_vision,  # the numbers cannot rank
            "sentence": _sentence(encoders, controls, blind, rows, cleared, diffs, labels)}


def _sentence(encoders, controls, blind, rows, cleared, diffs, labels) -> str:
    parts = []
    n = len(rows)
    if blind is not None:
        for enc in encoders:
            names = [labels.get(t, t) for t in cleared[enc]]
            listed = f" ({', '.join(names)})" if names else ""
            parts.append(f"{enc} beats blind on {len(names)} of {n} tasks{listed}")
        quiet = [r["label"] for r in rows if r["no_vision"]]
        if quiet and len(quiet) == n:
            parts.append(f"no encoder clears blind on any of the {n} tasks: at this budget the LLM does not use the "
                         f"image, so these numbers cannot rank the encoders")
        elif quiet:
            parts.append(f"no encoder clears blind on {', '.join(quiet)}: at this scale these do not need vision")
    init = next((c for c in controls if control_of(c) == "random-init"), None)
    if init is not None:
        d = diffs[init]
        for enc in encoders:
            mine = d[d["encoder"] == enc] if len(d) else d
            up = int(((mine["significant"]) & (mine["diff"] > 0)).sum()) if len(mine) else 0
            down = int(((mine["significant"]) & (mine["diff"] < 0)).sum()) if len(mine) else 0
            parts.append(f"pretraining {enc} beat random-init on {up} of {len(mine)} tasks"
                         + (f" and lost on {down}" if down else ""))
    return "; ".join(parts) + ". (A difference counts when its 95% paired-bootstrap interval excludes zero.)"



def caption_losses(run: dict) -> list[dict]:
    """Each bridge's vision-dependence measure (results rows caption_loss / heldout_nll: stage 1's caption loss on
    unseen scenes, nats per token), with its difference from the blind control's where the run has one: rows
    {"encoder", "role", "loss", "stderr", "vs_blind"} in the run's encoder order; [] when no bridge recorded it."""
    import math

    res = run["results"]
    res = res[(res["task"] == "caption_loss") & (res["metric"] == "heldout_nll")]
    got = {e: res[res["encoder"] == e].iloc[0] for e in run["encoders"] if (res["encoder"] == e).any()}
    blind = next((e for e in got if control_of(e) == "blind" and (run.get("roles") or {}).get(e) == "control"), None)
    rows = []
    for enc, r in got.items():
        loss, err = float(r["value"]), float(r["stderr"])
        row = {"encoder": enc, "role": (run.get("roles") or {}).get(enc, "encoder"), "loss": f"{loss:.3f}",
               "stderr": "" if math.isnan(err) else f"{err:.3f}", "vs_blind": ""}
        if blind is not None and enc != blind:
            other = got[blind]
            row["vs_blind"] = f"{loss - float(other['value']):+.3f}"
        rows.append(row)
    return rows
