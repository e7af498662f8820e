"""The report's headline: the experiment's own question, answered with its intervals.

    question   the experiment's `question:` (the default experiment: which objective gives the better encoder for a
               small multimodal LLM at this budget?)
    answer     per pair of encoders, the tasks where one is really better (95% paired-bootstrap interval over the
               same questions excludes zero); an encoder better on some task than every other and worse on none is
               the answer, otherwise the headline says that no objective is better beyond noise
    pretraining  per encoder and measure (the bridged tasks, the Fashion-MNIST linear probe): did pretraining beat
               the same tower at its initial weights (the random-init control; the probe's random-init floor)?

The probe's interval is the normal one for two proportions over its n_test images (the two probes do not share
predictions on disk, so it cannot be paired); the bridged tasks' are paired bootstraps (reports/stats.py).
"""

from __future__ import annotations

import math

from benchmarks.runner.experiment import control_of
from reports.stats import paired_differences


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pp(r) -> str:
    return f"{r['diff'] * 100:+.1f} [{r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]"


def pairwise(samples, encoders: list[str]) -> dict[tuple[str, str], list[dict]]:
    """(a, b) -> rows (task, diff, lo, hi, n, significant) of score(b) - score(a), for every ordered pair a < b."""
    out = {}
    for i, a in enumerate(encoders):
        others = encoders[i + 1:]
        if not others:
            continue
        d = paired_differences(samples[samples["encoder"].isin([a, *others])], reference=a)
        for b in others:
            out[(a, b)] = d[d["encoder"] == b].to_dict("records")
    return out


def answer(samples, encoders: list[str], labels: dict[str, str]) -> str:
    """Which encoder is better, with the intervals that say so (or that nothing is beyond noise)."""
    if len(encoders) < 2 or samples.empty:
        return "One encoder only: nothing to compare."
    pairs = pairwise(samples, encoders)
    better: dict[str, set] = {e: set() for e in encoders}  # encoders it beats somewhere
    worse: dict[str, set] = {e: set() for e in encoders}
    said = []
    for (a, b), rows in pairs.items():
        up = [r for r in rows if r["significant"] and r["diff"] > 0]
        down = [r for r in rows if r["significant"] and r["diff"] < 0]
        if up:
            better[b].add(a), worse[a].add(b)
        if down:
            better[a].add(b), worse[b].add(a)
        parts = [f"{b} better on {', '.join(labels.get(r['task'], r['task']) + ' ' + _pp(r) for r in up)}"] if up \
            else []
        parts += [f"{a} better on {', '.join(labels.get(r['task'], r['task']) + ' ' + _pp(_flip(r)) for r in down)}"] \
            if down else []
        if parts:
            said.append(f"{b} vs {a}: " + "; ".join(parts))
    winners = [e for e in encoders if len(better[e]) == len(encoders) - 1 and not worse[e]]
    n_tasks = len({r["task"] for rows in pairs.values() for r in rows})
    if winners:
        head = f"{winners[0]}: better than every other encoder on at least one task and worse on none."
    elif said:
        head = "No objective is better on every comparison: the real differences go both ways or leave pairs tied."
    else:
        return (f"No objective gives a better encoder beyond noise at this budget: between {_names(encoders)}, every "
                f"difference on all {n_tasks} tasks has a 95% interval that includes zero.")
    return head + " " + "; ".join(said) + " (points of questions answered right, 95% paired-bootstrap interval)."


def _flip(r: dict) -> dict:
    return {"diff": -r["diff"], "lo": -r["hi"], "hi": -r["lo"]}


def pretraining(run: dict, encoders: list[str], labels: dict[str, str]) -> list[str]:
    """One sentence per encoder: pretraining against random-init on the bridged tasks and on the probe."""
    roles = run.get("roles") or {}
    samples = run["samples"]
    init = next((e for e in run["encoders"] if roles.get(e) == "control" and control_of(e) == "random-init"
                 and (samples["encoder"] == e).any()), None)
    d = paired_differences(samples[samples["encoder"].isin([*encoders, init])], reference=init) if init else None
    out = []
    for enc in encoders:
        parts = []
        if d is not None and len(d):
            mine = d[d["encoder"] == enc]
            up = [labels.get(t, t) for t in mine.loc[mine["significant"] & (mine["diff"] > 0), "task"]]
            down = [labels.get(t, t) for t in mine.loc[mine["significant"] & (mine["diff"] < 0), "task"]]
            text = f"beat random-init on {len(up)} of {len(mine)} bridged tasks" + (f" ({_names(up)})" if up else "")
            parts.append(text + (f", lost on {_names(down)}" if down else ""))
        probe = (run.get("encoder_eval") or {}).get(enc) or {}
        if probe.get("random_init_linear_probe_acc") is not None and probe.get("linear_probe_acc") is not None:
            p1, p0, n = probe["linear_probe_acc"], probe["random_init_linear_probe_acc"], int(probe.get("n_test", 0))
            half = 1.96 * math.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / n) if n else float("nan")
            diff = p1 - p0
            verdict = "beat" if diff - half > 0 else "lost to" if diff + half < 0 else "did not beat"
            parts.append(f"{verdict} it on the Fashion-MNIST linear probe ({diff * 100:+.1f} "
                         f"[{(diff - half) * 100:+.1f}, {(diff + half) * 100:+.1f}] points, n = {n})")
        if parts:
            out.append(f"Pretraining {enc} " + "; ".join(parts) + ".")
    return out


def build_headline(run: dict, labels: dict[str, str]) -> dict | None:
    roles = run.get("roles") or {}
    encoders = [e for e in run["encoders"] if roles.get(e, "encoder") != "control"]
    if not encoders:
        return None
    question = str((run.get("experiment") or {}).get("question") or "").strip()
    samples = run["samples"]
    mine = samples[samples["encoder"].isin(encoders)] if len(samples) else samples
    return {"question": question, "answer": answer(mine, encoders, labels),
            "pretraining": pretraining(run, encoders, labels)}
