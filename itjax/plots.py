"""The figures of a study report (PNG, matplotlib's Agg canvas; no pyplot state, so notebooks and tests are safe).

* score_vs_size_<metric>.png: the metric (0-100) against train size on a log axis, one line per cell without its
  size axis (e.g. setting / encoding / start); references drawn as dashed lines (no size in their `where`) or
  stars (at their size). x positions: study.report['size_values'] (e.g. % of train instances), else the size
  value names that are numbers; names that are not (e.g. 'all') are placed past the largest number, doubling.
* categories_<metric>.png: per task category, one bar per cell at the largest train size scored.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

SIZE = (9.0, 5.0)  # inches; at DPI, the PNGs are 900 x 500 pixels
DPI = 100


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def size_positions(sizes: Sequence[str], size_values: Mapping[str, Any]) -> dict[str, float]:
    """x of each size value name (> 0, increasing for names that are not numbers)."""
    positions: dict[str, float] = {}
    for s in sizes:
        value = size_values.get(s, s)
        try:
            positions[s] = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(positions[s]) or positions[s] <= 0:
            raise ValueError(f"study.report['size_values'][{s!r}] = {value!r}: the x of a log axis must be > 0.")
    largest = max(positions.values(), default=0.5)
    for s in sizes:
        if s not in positions:
            largest *= 2
            positions[s] = largest
    return positions


def _label(row: Mapping[str, Any], axes: Sequence[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes) or "all"


def score_vs_size(rows: Sequence[Mapping[str, Any]], axes: Sequence[str], size_axis: str, sizes: Sequence[str],
                  metric: str, path: str, size_values: Mapping[str, Any] | None = None,
                  size_label: str = "train size", references: Sequence[Mapping[str, Any]] = (),
                  title: str = "") -> str:
    """Writes the score-vs-size plot of `metric` to `path` (see the module docstring); returns path."""
    x = size_positions(sizes, size_values or {})
    group_axes = [a for a in axes if a != size_axis]
    lines: dict[str, list] = {}
    for row in rows:
        if row.get(metric) is not None and row[size_axis] in x:
            lines.setdefault(_label(row, group_axes), []).append((x[row[size_axis]], row[metric],
                                                                  row.get(f"{metric}_sd") or 0.0))
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    for label, points in lines.items():
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=label)
    for i, ref in enumerate(r for r in references if r["metric"] == metric):
        color = f"C{(len(lines) + i) % 10}"
        size = ref["where"].get(size_axis)
        if size in x:
            ax.plot([x[size]], [ref["value"]], marker="*", markersize=12, linestyle="none", color=color,
                    label=f"{ref['name']} ({ref['value']:.2f})")
        elif size is None:
            ax.axhline(ref["value"], linestyle="--", linewidth=1, color=color,
                       label=f"{ref['name']} ({ref['value']:.2f})")
    ax.set_xscale("log")
    ax.set_xticks([x[s] for s in sizes])
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(f"{size_label} ({size_axis}, log scale)")
    ax.set_ylabel(f"{metric} (0-100)")
    ax.set_title(title or f"{metric} against train size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


def category_bars(rows: Sequence[Mapping[str, Any]], axes: Sequence[str], metric: str, path: str,
                  title: str = "") -> str:
    """Writes grouped bars of `metric` per category (x) and cell (bars) to `path`; returns path."""
    categories = sorted({r["category"] for r in rows})
    cells = list(dict.fromkeys(_label(r, axes) for r in rows))
    value = {(_label(r, axes), r["category"]): r[metric] for r in rows if r.get(metric) is not None}
    figure = _figure()
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(cells), 1)
    for j, cell in enumerate(cells):
        xs = [i + (j - (len(cells) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, [value.get((cell, c), 0.0) for c in categories], width=width, label=cell)
    ax.set_xticks(list(range(len(categories))))
    ax.set_xticklabels(categories, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (0-100)")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"{metric} per category")
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


def study_plots(data, tables: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str) -> list[str]:
    """The report's PNGs for a itjax.study_report.StudyData and its tables; returns their paths."""
    from itjax import study_report

    os.makedirs(out_dir, exist_ok=True)
    refs = study_report.references(data)
    paths = []
    overall = tables["overall"]
    if data.size_axis is not None:
        sizes = study_report.size_order(data)
        for metric in study_report.METRICS:
            paths.append(score_vs_size(
                overall, data.axes, data.size_axis, sizes, metric,
                os.path.join(out_dir, f"score_vs_size_{metric}.png"), data.options.get("size_values"),
                data.options.get("size_label", "train size"), refs, title=f"{data.name}: {metric} against train size"))
    categories = tables["categories"]
    if categories:
        if data.size_axis is not None:  # at the largest size any cell was scored at
            scored = {r[data.size_axis] for r in overall if r["rougeL"] is not None}
            largest = [s for s in study_report.size_order(data) if s in scored][-1:]
            categories = [r for r in categories if r[data.size_axis] in largest]
            where = f" ({data.size_axis}={largest[0]})" if largest else ""
        else:
            where = ""
        axes = [a for a in data.axes if a != data.size_axis]
        for metric in study_report.METRICS:
            paths.append(category_bars(categories, axes, metric, os.path.join(out_dir, f"categories_{metric}.png"),
                                       title=f"{data.name}: {metric} per category{where}"))
    return paths
