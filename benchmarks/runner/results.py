"""The run's tidy results table, built only from the stage folders on disk.

    RUN/results.csv, RUN/results.parquet
    columns: COLUMNS (experiment, encoder, task, metric, value, stderr, n, chance, seed, primary; reports.collect
    reads them by this name)
    (`chance` is set on each task's primary metric; encoder-level rows are fmnist_probe / fmnist_zeroshot /
    fmnist_probe_init with metric "accuracy"; each bridge's vision-dependence row is caption_loss / heldout_nll)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from benchmarks.runner.plan import Stage

COLUMNS = ["experiment", "encoder", "role", "task", "metric", "value", "stderr", "n", "chance", "seed", "primary"]


def _num(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x


def _eval_rows(scores: dict) -> list[dict]:
    rows = []
    for task, res in (scores.get("tasks") or {}).items():
        if res.get("status") != "ok":
            continue
        for metric, m in (res.get("metrics") or {}).items():
            m = m if isinstance(m, dict) else {"value": m}
            primary = metric == res.get("primary") and not res.get("subtasks")  # a group's tasks are the primaries
            rows.append({"task": task, "metric": metric, "value": _num(m.get("value")), "stderr": _num(m.get("stderr")),
                         "n": res.get("n"), "chance": _num(res.get("chance")) if primary else math.nan,
                         "primary": primary})
        if res.get("n") and res.get("empty") is not None:  # empty answers: scored 0 above, counted here
            rows.append({"task": task, "metric": "empty_answers", "value": res["empty"] / res["n"], "stderr": math.nan,
                         "n": res["n"], "chance": math.nan, "primary": False})
    return rows


def _encoder_eval_rows(result: dict) -> list[dict]:
    n, chance = result.get("n_test"), _num(result.get("chance"))
    rows = []
    for task, key in (("fmnist_probe", "linear_probe_acc"), ("fmnist_zeroshot", "zero_shot_acc"),
                      ("fmnist_probe_init", "random_init_linear_probe_acc")):
        if key in result:
            value = _num(result[key])
            stderr = math.sqrt(value * (1 - value) / n) if n and 0 <= value <= 1 else math.nan
            rows.append({"task": task, "metric": "accuracy", "value": value, "stderr": stderr, "n": n,
                         "chance": chance, "primary": True})
    return rows


def _bridge_rows(summary: dict) -> list[dict]:
    """The bridge's vision-dependence measure: stage 1's caption loss on unseen scenes (nats per token; lower is
    better; the blind control's is the no-image floor)."""
    loss = summary.get("caption_loss")
    if not isinstance(loss, dict):
        return []
    return [{"task": "caption_loss", "metric": "heldout_nll", "value": _num(loss.get("loss")),
             "stderr": _num(loss.get("stderr")), "n": loss.get("n"), "chance": math.nan, "primary": False}]


def collect(experiment: str, stages: list[Stage]) -> pd.DataFrame:
    rows = []
    for st in stages:
        if st.name == "eval":
            path, parse = st.folder / "scores.json", _eval_rows
        elif st.name == "encoder_eval":
            path, parse = st.folder / "result.json", _encoder_eval_rows
        elif st.name == "bridge":
            path, parse = st.folder / "summary.json", _bridge_rows
        else:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for row in parse(data):
            rows.append({"experiment": experiment, "encoder": st.encoder, "role": st.role, "seed": st.seed, **row})
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"value": float, "stderr": float, "chance": float})


def write(table: pd.DataFrame, run_dir: Path) -> None:
    table.to_csv(run_dir / "results.csv", index=False)
    table.to_parquet(run_dir / "results.parquet", index=False)


def pivot_text(table: pd.DataFrame) -> str:
    """Encoder x task of the primary metrics, `value ± stderr`, as plain text."""
    main = table[table["primary"].astype(bool)]
    if main.empty:
        return "(no results)"
    cells = main.assign(cell=[f"{v:.3g}" + (f" ± {s:.2g}" if s == s else "") for v, s in zip(main["value"],
                                                                                           main["stderr"])])
    grid = cells.pivot_table(index="encoder", columns="task", values="cell", aggfunc="first", sort=False)
    chance = main.groupby("task", sort=False)["chance"].first()
    grid.loc["(chance)"] = [f"{chance.get(t):.3g}" if chance.get(t) == chance.get(t) else "" for t in grid.columns]
    return grid.fillna("-").to_string()
