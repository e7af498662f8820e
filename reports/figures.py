"""Figures as data URIs: matplotlib (Agg) charts as base64 SVG, example images as small PNGs.

Charts go in <img src="data:image/svg+xml;base64,..."> rather than inline <svg>: a browser never runs script inside
an image, so a label such as an encoder's name cannot become markup, and the file stays self-contained.
"""

from __future__ import annotations

import base64
import functools
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PALETTE = ["#2f6fb0", "#e07b39", "#3a9a5b", "#b8455a", "#7d5ba6", "#8c6d31", "#4aa3b5", "#777777"]
STYLE = {  # applied per figure (plt.rc_context), so that importing this module changes no one else's plots
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#888888",
    "axes.titlesize": 10, "axes.titleweight": "bold", "axes.grid": True, "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6, "axes.axisbelow": True, "legend.frameon": False, "svg.hashsalt": "ov2",
    "svg.fonttype": "none",  # text stays text (a third of the size); the browser draws it with its sans-serif
}


def _styled(make):
    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return make(*args, **kwargs)
    return wrapper


def colours(encoders: list[str]) -> dict[str, str]:
    return {enc: PALETTE[i % len(PALETTE)] for i, enc in enumerate(encoders)}


def _plain(text: str) -> str:
    """matplotlib reads $...$ as maths; labels are plain text."""
    return str(text).replace("$", r"\$")


def svg_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def png_uri(image, size: int = 96) -> str:
    """A PIL image as a PNG data URI, at most `size` pixels on its long side (never upscaled past 2x)."""
    image = image.convert("RGB")
    scale = min(size / max(image.size), 2.0)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _level(ax, y: float, label: str) -> None:
    """A dashed horizontal line at y (chance, a floor), labelled just above its right end."""
    ax.axhline(y, color="#555555", linestyle="--", linewidth=1)
    ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), xytext=(0, 2), textcoords="offset points",
                ha="right", va="bottom", fontsize=7, color="#555555")


@_styled
def task_chart(title: str, bars: list[dict], chance: float | None, unit: str, colour: dict[str, str]) -> str:
    """Bars (encoder, value, stderr) with 1.96 x stderr error bars and chance as a dashed line."""
    fig, ax = plt.subplots(figsize=(3.3, 2.3))
    names = [b["encoder"] for b in bars]
    values = [b["value"] if b["value"] is not None else 0.0 for b in bars]
    errors = [1.96 * b["stderr"] if b.get("stderr") is not None else 0.0 for b in bars]
    ax.bar(range(len(bars)), values, width=0.62, color=[colour.get(n, "#999999") for n in names])
    with_err = [i for i, b in enumerate(bars) if b["value"] is not None and b.get("stderr") is not None]
    if with_err:
        ax.errorbar(with_err, [values[i] for i in with_err], yerr=[errors[i] for i in with_err], fmt="none",
                    capsize=3, elinewidth=1, ecolor="#333333")
    top = max([v + e for v, e in zip(values, errors)] + [chance or 0.0, 1e-9])
    for i, b in enumerate(bars):
        if b["value"] is None:
            ax.text(i, top * 0.5, "no result", ha="center", va="center", fontsize=7, color="#999999", rotation=90)
    if chance:  # an open-answer task (chance 0) gets no line
        _level(ax, chance, "chance")
    ax.set_xticks(range(len(bars)), [_plain(n) for n in names])
    ax.set_title(_plain(title), loc="left")
    ax.set_ylabel(unit)
    ax.set_ylim(0, top * 1.15)
    ax.grid(axis="x", visible=False)
    return svg_uri(fig)


@_styled
def curve_chart(title: str, curves: pd.DataFrame, colour: dict[str, str]) -> str:
    """Loss against step (left) and against wall-clock seconds (right), one line per encoder."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.5), sharey=True)
    for enc, group in curves.groupby("encoder", sort=False):
        group = group.sort_values("step")
        style = {"color": colour.get(enc, "#999999"), "linewidth": 1.4, "label": _plain(enc)}
        axes[0].plot(group["step"], group["loss"], **style)
        timed = group.dropna(subset=["seconds"])
        if len(timed):
            axes[1].plot(timed["seconds"], timed["loss"], **style)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel("loss")
    axes[0].set_title(_plain(title), loc="left")
    axes[1].legend(loc="upper right", fontsize=8)
    return svg_uri(fig)


@_styled
def grouped_chart(title: str, groups: list[str], series: dict[str, list[float | None]], colour: dict[str, str],
                  floor: float | None = None, floor_label: str = "chance", unit: str = "%") -> str:
    """Grouped bars: one group per label in `groups`, one bar per encoder (series: encoder -> values)."""
    fig, ax = plt.subplots(figsize=(5.2, 2.5))
    k = max(len(series), 1)
    width = 0.8 / k
    for i, (enc, values) in enumerate(series.items()):
        xs = [g + (i - (k - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width * 0.92,
               color=colour.get(enc, "#999999"), label=_plain(enc))
    if floor is not None:
        _level(ax, floor, floor_label)
    ax.set_xticks(range(len(groups)), [_plain(g) for g in groups])
    ax.set_ylabel(unit)
    ax.set_title(_plain(title), loc="left")
    ax.grid(axis="x", visible=False)
    ax.legend(fontsize=8, ncols=min(k, 4), loc="upper left", bbox_to_anchor=(0, -0.12))
    return svg_uri(fig)
