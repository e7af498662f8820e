"""Paired bootstrap over the same questions: is the difference between two encoders on one task real?

lmms-eval reports one stderr per task and encoder; two such intervals overlap long before a difference stops being
real, because both encoders answered the very same questions. Pairing removes that shared variation:

    d_i = score_B(question i) - score_A(question i)        i over the questions both answered
    difference = mean(d);  interval = 2.5 / 97.5 percentiles of mean(d[resampled i]) over `n_boot` resamples
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of b - a with a percentile interval; a and b are per-question scores in the same order."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two equal 1-D arrays, got {a.shape} and {b.shape}")
    d = b - a
    n = len(d)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "significant": False}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # in blocks: n_boot x n indices would be large for big tasks
        idx = rng.integers(0, n, size=(min(256, n_boot - start), n))
        means[start:start + len(idx)] = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": n,
            "significant": bool(lo > 0 or hi < 0)}


def paired_differences(samples: pd.DataFrame, reference: str, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (encoder, task) other than the reference: paired bootstrap of score(encoder) - score(reference).

    `samples` has columns encoder, task, doc_id, score (one row per question and encoder)."""
    cols = ["encoder", "task", "diff", "lo", "hi", "n", "significant"]
    if samples.empty or reference not in set(samples["encoder"]):
        return pd.DataFrame(columns=cols)
    rows = []
    ref = samples[samples["encoder"] == reference]
    for (encoder, task), group in samples[samples["encoder"] != reference].groupby(["encoder", "task"], sort=False):
        base = ref[ref["task"] == task]
        merged = base[["doc_id", "score"]].merge(group[["doc_id", "score"]], on="doc_id", suffixes=("_a", "_b"))
        merged = merged.dropna()
        result = paired_bootstrap(merged["score_a"], merged["score_b"], n_boot=n_boot, seed=seed)
        rows.append({"encoder": encoder, "task": task, **result})
    return pd.DataFrame(rows, columns=cols)
