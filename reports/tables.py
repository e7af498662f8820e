"""A DataFrame as plain cells for the templates: text per cell, and which columns are numbers (right-aligned)."""

from __future__ import annotations

import math

import pandas as pd


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
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
    # a float column whose values are all whole numbers (counts with gaps, years, sizes) prints without decimals
    whole = [pd.api.types.is_float_dtype(df[c]) and bool(df[c].dropna().map(float.is_integer).all())
             for c in df.columns]
    rows = [[f"{v:.0f}" if isinstance(v, float) and v == v and (whole[i] or (v.is_integer() and abs(v) > 1000))
             else fmt(v, digits) for i, v in enumerate(row)] for row in df.itertuples(index=False)]
    return {"columns": [str(c) for c in df.columns], "rows": rows, "numeric": numeric}
