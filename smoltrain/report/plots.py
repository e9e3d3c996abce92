"""PNG plots for reports: line curves with seed bands, bars with error bars, panels of bars.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot global state), so
plotting is safe in any process, with or without a display, and never leaks figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smoltrain.files import write_atomic

# A fixed palette so a variant keeps its colour across every plot of a report.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def color_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render on the Agg canvas and write atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # The temporary name keeps the .png suffix: savefig picks the format from it.
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None,
    hlines: Mapping[str, float] | None = None,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One line per label (x, y); optional shaded (x, low, high) band per label and dashed
    horizontal reference lines (e.g. a unigram baseline)."""
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for i, (label, (x, y)) in enumerate(series.items()):
        color = (colors or {}).get(label, color_of(i))
        ax.plot(list(x), list(y), label=label, color=color, linewidth=1.6)
        if bands and label in bands:
            bx, low, high = bands[label]
            ax.fill_between(list(bx), list(low), list(high), color=color, alpha=0.2, linewidth=0)
    for j, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, linestyle="--", color="#555555", linewidth=1.0, alpha=0.8 - 0.2 * (j % 3))
        ax.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", fontsize=8, color="#555555")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def stacked_plot(
    path: str | os.PathLike,
    x: Sequence[float],
    layers: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
) -> Path:
    """Layers stacked over x (each layer's band is its share of the total), the first at the bottom."""
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    ax.stackplot(list(x), *[list(y) for y in layers.values()], labels=list(layers),
                 colors=[color_of(i) for i in range(len(layers))], alpha=0.85)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def bar_plot(
    path: str | os.PathLike,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    errors: Sequence[float] | None = None,
    reference: tuple[str, float] | None = None,
    title: str = "",
    ylabel: str = "",
    colors: Sequence[str] | None = None,
    value_format: str = "{:.3g}",
) -> Path:
    """Bars with optional error bars, the value written on each bar, and a dashed reference line."""
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(labels)), 3.8))
    ax = fig.subplots()
    _bars(ax, labels, values, errors, colors, value_format, zoom=False)
    if reference is not None:
        ax.axhline(reference[1], linestyle="--", color="#555555", linewidth=1.0, label=reference[0])
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return save_figure(fig, path)


def bar_panels(
    path: str | os.PathLike,
    panels: Mapping[str, tuple[Sequence[str], Sequence[float], Sequence[float] | None]],
    *,
    references: Mapping[str, float] | None = None,
    title: str = "",
    ncols: int = 3,
    colors: Sequence[str] | None = None,
    zoom: bool = True,
) -> Path:
    """Small multiples: one bar chart per metric (metrics have different scales), same labels in each."""
    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, (labels, values, errors)) in zip(axes.flat, panels.items()):
        _bars(ax, labels, values, errors, colors, "{:.3g}", zoom)
        if references and name in references:
            ax.axhline(references[name], linestyle="--", color="#555555", linewidth=1.0)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def line_panels(path: str | os.PathLike, panels: Mapping[str, Sequence[tuple[float, float]]], *, ncols: int = 3,
                xlabel: str = "step") -> Path:
    """Small multiples: one curve of (x, y) points per panel (curves of different quantities and scales)."""
    n = max(1, len(panels))
    ncols = min(ncols, n)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * math.ceil(n / ncols)))
    axes = fig.subplots(math.ceil(n / ncols), ncols, squeeze=False)
    for i, (ax, (title, points)) in enumerate(zip(axes.flat, panels.items())):
        ax.plot(*zip(*points), color=color_of(i), linewidth=1.4, marker="o" if len(points) < 12 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def _bars(ax, labels, values, errors, colors, value_format, zoom: bool = True) -> None:
    """zoom: values far from zero that differ little (losses) get an axis around them, not from 0."""
    colors = list(colors) if colors else [color_of(i) for i in range(len(labels))]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    clean = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    yerr = [e if e is not None and math.isfinite(e) else 0.0 for e in errors] if errors is not None else None
    ax.bar(range(len(labels)), clean, yerr=yerr, color=colors[: len(labels)], capsize=4, alpha=0.85)
    ax.set_xticks(range(len(labels)), labels)
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            top_of_bar = v + (yerr[i] if yerr and v >= 0 else 0.0)
            ax.annotate(value_format.format(v), xy=(i, top_of_bar), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    if finite:
        low, high = min(finite), max(finite)
        err = max(yerr) if yerr else 0.0
        if zoom and low > 0 and high - low < 0.25 * high:
            spread = max(high - low + 2 * err, 0.05 * high)
            ax.set_ylim(low - err - 0.6 * spread, high + err + 0.3 * spread)
        else:
            top = max(high + err, 0.0)
            ax.set_ylim(min(low - err, 0.0), top * 1.12 if top > 0 else 1.0)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.grid(axis="y", alpha=0.3)


def heat_map(
    path: str | os.PathLike,
    values: Sequence[Sequence[float]],
    *,
    x: Sequence[float],
    row_labels: Sequence[str],
    title: str = "",
    xlabel: str = "step",
    colorbar: str = "",
    center: float = 1.0,
) -> Path:
    """values[row][column] as colours (columns at x), diverging around `center` so that both
    directions away from it (an overloaded expert, a starved one) stand out."""
    from matplotlib.colors import TwoSlopeNorm

    rows, high = len(values), max((max(r) for r in values if len(r)), default=center)
    fig = Figure(figsize=(7.5, max(2.5, min(12.0, 0.18 * rows + 1.5))))
    ax = fig.subplots()
    norm = TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=max(high, center * 1.001))
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=norm,
                      extent=(x[0] - 0.5, x[-1] + 0.5, rows - 0.5, -0.5))
    step = max(1, rows // 24)  # at most ~24 tick labels
    ax.set_yticks(range(0, rows, step), [row_labels[i] for i in range(0, rows, step)], fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.colorbar(image, ax=ax, label=colorbar)
    return save_figure(fig, path)


def score_grid(path: str | os.PathLike, values: Sequence[Sequence[float | None]], *, row_labels: Sequence[str],
               column_labels: Sequence[str], title: str = "", xlabel: str = "", colorbar: str = "") -> Path:
    """Scores in [0, 1] as a red (0) to green (1) grid with the value written in each cell (blank: not measured)."""
    fig = Figure(figsize=(max(4.0, 0.9 * len(column_labels) + 2.5), max(2.0, 0.4 * len(row_labels) + 1.2)))
    ax = fig.subplots()
    grid = [[math.nan if v is None else v for v in row] for row in values]
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdYlGn", vmin=0.0, vmax=1.0)
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if value is not None:
                ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(column_labels)), column_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.colorbar(image, ax=ax, label=colorbar)
    return save_figure(fig, path)
