"""Files on disk -> pandas tables and plain dicts: everything the report shows, and nothing it computes.

    RUN/experiment.yaml, RUN/run.json                        -> run["experiment"], run["provenance"]
    RUN/results.csv (or results.parquet)                     -> run["results"]  (tidy: encoder, task, metric, value...)
    RUN/encoders/<enc>/<stage>/status.json (+ stage.json's command, the tail of a failed stage's stage.log)
                                                             -> run["status"]   (encoder, stage, state, error, ...)
    RUN/encoders/<enc>/eval/scores.json, samples/<task>.jsonl -> run["scores"], run["samples"]
    RUN/encoders/<enc>/pretrain/metrics.jsonl, bridge/stage{1,2}/metrics.jsonl -> run["curves"]
    RUN/encoders/<enc>/encoder_eval/result.json              -> run["encoder_eval"]
    reports/reference/<paper>.csv, benchmarks/results/kernels_cpu.md -> load_paper, load_markdown_tables

Missing files give empty tables: a report of a half-finished run must still build. A results table that exists but
cannot be read raises BadRunFolder (one line for the CLI).
Encoders are called by their display label (`label:` in experiment.yaml) once read; run["families"] keeps the
preset of each, which picks the OpenVision 2 reference row.
The built-in tasks (labels, paper columns) are benchmarks/evals/suite/tasks.py:TASKS and the results columns
come from benchmarks/runner/results.py:COLUMNS; neither is written here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.runner.experiment import control_of
from benchmarks.runner.results import COLUMNS
from ov2.runfolder import read_metrics, read_status

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "reports" / "reference"
RESULTS_DIR = REPO / "benchmarks" / "results"

STAGES = ("pretrain", "export", "bridge", "eval", "encoder_eval")
# built-in task -> (label in the report, the paper table's column): a view of the suite's one table
BRIDGE_MEASURES = ("caption_loss",)  # a bridge's own rows (runner.results._bridge_rows), not a benchmark task
ENCODER_TASKS = {"fmnist_probe": "linear probe", "fmnist_zeroshot": "zero-shot",
                 "fmnist_probe_init": "random-init probe"}
CURVES = {"pretrain": ("pretrain", "metrics.jsonl"), "bridge stage 1": ("bridge", "stage1/metrics.jsonl"),
          "bridge stage 2": ("bridge", "stage2/metrics.jsonl")}
STATUS_FIELDS = ("state", "error", "wall_s", "peak_rss_mb", "started", "finished", "key")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _jsonl(path: Path) -> list[dict]:
    try:
        return [row for row in read_metrics(path) if isinstance(row, dict)]
    except (OSError, ValueError):
        return []


class BadRunFolder(ValueError):
    """A file of the run folder that exists but cannot be read as what it should be."""


def read_results(run: Path) -> pd.DataFrame:
    """The tidy results table (csv first, parquet when there is no csv); numbers as floats."""
    table = pd.DataFrame(columns=COLUMNS)
    path = run / "results.csv" if (run / "results.csv").is_file() else run / "results.parquet"
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path)
        elif path.is_file():
            table = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        pass
    except Exception as err:  # a truncated or foreign file: name it, one line
        raise BadRunFolder(f"{path} is not a results table ({type(err).__name__}: {str(err).splitlines()[0]})") \
            from None
    if len(table.columns) and not {"encoder", "task", "value"} <= set(table.columns):
        raise BadRunFolder(f"{path} lacks the columns encoder, task, value")
    for col in COLUMNS:
        if col not in table.columns:
            table[col] = None
    for col in ("value", "stderr", "n", "chance"):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    if table["primary"].notna().any():  # csv gives True/False (or "True"/"False" after a round trip)
        table["primary"] = table["primary"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    table["metric"] = table["metric"].where(table["metric"].notna(), "value")  # a table of encoder,task,value
    table["encoder"] = table["encoder"].astype(str)
    table["task"] = table["task"].astype(str)
    return table


def experiment_encoders(experiment: dict) -> list[str]:
    """Encoder names in the experiment's order (a list of dicts with `name`, a list of names, or a mapping)."""
    encoders = experiment.get("encoders") or []
    if isinstance(encoders, dict):
        return [str(name) for name in encoders]
    names = []
    for item in encoders:
        name = item.get("name") if isinstance(item, dict) else item
        if name is not None:
            names.append(str(name))
    return names


def experiment_labels(experiment: dict) -> dict[str, str]:
    """name -> display label, for encoders whose entry has a `label`."""
    encoders = experiment.get("encoders") or []
    items = encoders.items() if isinstance(encoders, dict) else [(e.get("name"), e) for e in encoders
                                                                 if isinstance(e, dict)]
    return {str(k): v["label"] for k, v in items if isinstance(v, dict) and v.get("label")}


def encoder_family(experiment: dict, name: str) -> str:
    """The encoder's preset or family as written in the experiment ('' when unknown)."""
    encoders = experiment.get("encoders") or []
    if isinstance(encoders, dict):  # the runner's resolved form: {name: {preset: ..., ...}}
        encoders = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in encoders.items()]
    for item in encoders:
        if isinstance(item, dict) and str(item.get("name")) == name:
            return str(item.get("family") or item.get("preset") or "")
    return ""


def encoder_dir(name: str) -> str:
    """The folder name of an encoder under RUN/encoders/: its name, with anything but [A-Za-z0-9._-] as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def load_run(run_dir: str | Path) -> dict:
    """Everything on disk about one run folder (see the module docstring)."""
    run = Path(run_dir)
    experiment = _yaml(run / "experiment.yaml")
    results = read_results(run)
    enc_root = run / "encoders"
    found = sorted(p.name for p in enc_root.iterdir() if p.is_dir()) if enc_root.is_dir() else []
    order = experiment_encoders(experiment)
    named = {encoder_dir(e) for e in order}
    encoders = order + [e for e in found + list(dict.fromkeys(results["encoder"])) if e not in order and e not in named]
    encoders = list(dict.fromkeys(encoders))

    status, samples, curves, scores, enc_eval, configs = [], [], [], {}, {}, {}
    for enc in encoders:
        plain = "/" not in enc and enc not in (".", "..") and (enc_root / enc).is_dir()
        folder = enc_root / enc if plain else enc_root / encoder_dir(enc)
        for stage in STAGES:
            st = read_status(folder / stage)
            if st is not None:
                command = _json(folder / stage / "stage.json").get("command")
                log = None
                if st.get("state") in ("failed", "interrupted") and (folder / stage / "stage.log").is_file():
                    log = "\n".join((folder / stage / "stage.log").read_text(errors="replace").splitlines()[-25:])
                status.append({"encoder": enc, "stage": stage, **{k: st.get(k) for k in STATUS_FIELDS},
                               "command": " ".join(map(str, command)) if isinstance(command, list) else command,
                               "log": log})
            for name in ("config.yaml", "stage1/config.yaml", "stage2/config.yaml"):
                if (folder / stage / name).is_file():
                    configs[(enc, f"{stage}/{name}")] = (folder / stage / name).read_text(errors="replace")
        scores[enc] = _json(folder / "eval" / "scores.json")
        sample_dir = folder / "eval" / "samples"
        for path in sorted(sample_dir.glob("*.jsonl")) if sample_dir.is_dir() else []:
            for row in _jsonl(path):
                samples.append({"encoder": enc, "task": path.stem, **row})
        for label, (stage, rel) in CURVES.items():
            for row in _jsonl(folder / stage / rel):
                t = row.get("elapsed_s")
                curves.append({"encoder": enc, "curve": label, "step": row.get("step"), "loss": row.get("loss"),
                               "seconds": t})
        enc_eval[enc] = _json(folder / "encoder_eval" / "result.json")

    sample_cols = ["encoder", "task", "doc_id", "question", "target", "prediction", "score", "type"]
    samples = pd.DataFrame(samples)
    for col in sample_cols:
        if col not in samples.columns:
            samples[col] = None
    samples["score"] = pd.to_numeric(samples["score"], errors="coerce")
    curves = pd.DataFrame(curves, columns=["encoder", "curve", "step", "loss", "seconds"])
    for col in ("step", "loss", "seconds"):
        curves[col] = pd.to_numeric(curves[col], errors="coerce")
    status = pd.DataFrame(status, columns=["encoder", "stage", *STATUS_FIELDS, "command", "log"])
    samples, curves = samples[sample_cols].copy(), curves.dropna(subset=["step", "loss"]).copy()
    # from here on an encoder is called by its display label (the experiment's `label:`), when labels are distinct
    labels = {e: str(lab) for e, lab in experiment_labels(experiment).items() if lab and str(lab) != e}
    if len(set(labels.values()) | (set(encoders) - set(labels))) < len(encoders):
        labels = {}
    show = lambda e: labels.get(e, e)  # noqa: E731
    for table in (results, status, samples, curves):
        table["encoder"] = table["encoder"].map(show)
    return {
        "dir": run, "name": str(experiment.get("name") or run.name), "experiment": experiment,
        "provenance": _json(run / "run.json"), "results": results, "encoders": [show(e) for e in encoders],
        "families": {show(e): encoder_family(experiment, e) for e in encoders}, "status": status,
        "samples": samples, "scores": {show(k): v for k, v in scores.items()}, "curves": curves,
        "encoder_eval": {show(k): v for k, v in enc_eval.items() if v},
        "configs": {(show(e), name): text for (e, name), text in configs.items()}, "data_dir": run / "data",
        "roles": {show(e): _role(e, show(e), experiment, results) for e in encoders},
        "held_in": held_in_tasks(experiment),
    }


def held_in_tasks(experiment: dict) -> list[str]:
    """The tasks whose train split the bridge's stage-2 mix holds (`bridge.overrides.stage2_tasks`): held-in."""
    overrides = (experiment.get("bridge") or {}).get("overrides") or {}
    tasks = overrides.get("stage2_tasks", "")
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [str(t).strip() for t in tasks or [] if str(t).strip()]


def _role(encoder: str, label: str, experiment: dict, results: pd.DataFrame) -> str:
    """encoder, or control (the experiment's blind / random-init runs, also per seed: blind-seed1): the results
    table's role column (rows under their display label), else the experiment's `controls:`."""
    roles = results.loc[results["encoder"] == label, "role"].dropna()
    if len(roles):
        return str(roles.iloc[0])
    controls = experiment.get("controls")
    controls = controls if isinstance(controls, list) else []
    return "control" if control_of(encoder, controls) else "encoder"


def load_paper(name: str | None, reference_dir: Path = REFERENCE_DIR) -> pd.DataFrame | None:
    """The paper table the experiment names (`paper: <name>`), or None when none is named or the file is absent."""
    if not name:
        return None
    path = Path(reference_dir) / f"{Path(str(name)).stem}.csv"
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def load_markdown_tables(path: Path) -> list[dict]:
    """A markdown file as blocks: {"text": paragraph} or {"table": DataFrame} (pipe tables only)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    blocks, table, para = [], [], []

    def flush():
        if table:
            header = [c.strip() for c in table[0].strip().strip("|").split("|")]
            body = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table[2:]]
            body = [(row + [""] * len(header))[:len(header)] for row in body]
            blocks.append({"table": pd.DataFrame(body, columns=header)})
            table.clear()
        if para:
            blocks.append({"text": " ".join(para).lstrip("# ").strip(), "heading": para[0].startswith("#")})
            para.clear()

    for line in lines:
        if line.strip().startswith("|"):
            if para:
                flush()
            table.append(line)
        elif not line.strip():
            flush()
        else:
            if table:
                flush()
            if line.startswith("#"):
                flush()
            para.append(line.strip())
            if line.startswith("#"):
                flush()
    flush()
    return blocks
