"""`CompareView(comparison)`: what `%llm_compare` shows in a notebook.

The comparison's table (evaluations, final and best losses, spec diff), a bar chart per metric
with the value on each bar, one colour per run and a baseline near the smallest value (bars
from 0 make 12.35 and 12.11 look the same), and the runs' curves overlaid in one dashboard.
"""

from __future__ import annotations

from typing import Any

import bqplot as bq
import ipywidgets as w

from ..display import METRIC_TITLES, comparison_html, run_color
from ..evaluation import Comparison
from ..runs import Run


def baseline(values: list[float]) -> float:
    """Where a metric's bars start: below the smallest value by the spread (or by a tenth of the
    value when they are equal), never below 0 for values that are all positive."""
    lo, hi = min(values), max(values)
    spread = hi - lo if hi > lo else abs(lo) * 0.1 or 1.0
    base = lo - spread
    return max(base, 0.0) if lo >= 0 else base


def _bars(c: Comparison, key: str) -> bq.Figure:
    idx = [i for i, r in enumerate(c.rows) if r[key] is not None]
    values = [float(c.rows[i][key]) for i in idx]
    labels = c.labels()
    x = bq.OrdinalScale()
    y = bq.LinearScale(min=baseline(values), max=max(values) + (max(values) - baseline(values)) * 0.15)
    bars = bq.Bars(x=[labels[i] for i in idx], y=values, scales={"x": x, "y": y}, color_mode="no_group",
                   colors=[run_color(i) for i in idx], label_display=True, label_display_format=".4g",
                   label_font_style={"font-size": "12px"}, base=baseline(values))  # fmt: skip
    title = METRIC_TITLES.get(key, key)
    return bq.Figure(
        marks=[bars], title=title, axes=[bq.Axis(scale=x, label="run", tick_rotate=-20 if len(idx) > 3 else 0),
                                         bq.Axis(scale=y, side="left", label=title, tick_format=".4~g",
                                                 label_offset="58px")],
        fig_margin={"top": 40, "bottom": 60, "left": 80, "right": 10},
        layout=w.Layout(width="300px", height="260px"),
    )  # fmt: skip


class CompareView(w.VBox):
    """`CompareView(compare([a, b]))` or `CompareView([a, b])`."""

    def __init__(self, comparison: Comparison | list[Run | str], curves: bool = True):
        self.comparison = c = comparison if isinstance(comparison, Comparison) else Comparison(comparison)
        self.table = w.HTML(comparison_html(c))
        self.bars = {k: _bars(c, k) for k in [*c.train_metrics, *c.metrics]}
        children: list[Any] = [
            self.table,
            w.HBox(list(self.bars.values()), layout=w.Layout(flex_flow="row wrap")),
        ]
        self.dashboard = None
        if curves and c.rows:
            from .dashboard import Dashboard

            self.dashboard = Dashboard([r if isinstance(r, Run) else Run(r.path) for r in c.runs])
            children.append(self.dashboard)
        super().__init__(children)
        self.add_class("jupyter-llm-compare-view")
