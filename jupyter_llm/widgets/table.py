"""`RunsTable()`: every run with its state, progress and last loss; selecting one opens its
dashboard below the table. A background thread refreshes the rows every few seconds."""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as w

from ..display import badge, runs_rows
from ..runs import RunStore
from ..summary import fmt_duration
from .dashboard import Dashboard

REFRESH_S = 2.0
# fits a 460-px notebook (the sidebar open in a 900-px window); long ids end in an ellipsis
COLUMNS = "minmax(70px, 2fr) minmax(50px, 1fr) 80px minmax(50px, 1fr) 64px 56px 56px minmax(0, 1fr)"


class _Row:
    def __init__(self, run_id: str, table: RunsTable):
        self.run_id = run_id
        self.open = w.Button(description=run_id, tooltip=f"open the dashboard of {run_id}", layout=_cell())
        self.open.on_click(lambda _: table.select(run_id))
        self.name, self.state, self.step = (
            w.HTML(layout=_cell()),
            w.HTML(layout=_cell()),
            w.HTML(layout=_cell()),
        )
        self.progress = w.FloatProgress(min=0, max=1, layout=_cell())
        self.loss, self.duration, self.started = (w.HTML(layout=_cell()) for _ in range(3))
        self.cells = [self.open, self.name, self.state, self.progress, self.step, self.loss, self.duration,
                      self.started]  # fmt: skip

    def update(self, r: dict[str, Any]) -> None:
        self.state.value = badge(r["state"])
        total = r["total"] or 0
        self.progress.value = min(1.0, r["step"] / total) if total else 0.0
        self.step.value = f"{r['step']}/{total or '?'}"
        self.loss.value = "" if r["loss"] is None else f"{r['loss']:.4f}"
        self.name.value = _clip(r["name"] or "")
        self.duration.value = fmt_duration(r["duration_s"])
        self.started.value = _clip(r["started"].replace("T", " "))


def _cell() -> w.Layout:
    """A grid cell that may shrink below its content's width (its text then ends in '…')."""
    return w.Layout(width="auto", min_width="0", overflow="hidden")


def _clip(text: str) -> str:
    """Text that ends in an ellipsis where its column is narrower (the whole of it on hover)."""
    t = html.escape(text)
    return f'<div style="overflow:hidden;text-overflow:ellipsis;white-space:nowrap" title="{t}">{t}</div>'


class RunsTable(w.VBox):
    """All runs under the runs root (newest first); click a run to open its dashboard."""

    def __init__(self, root: str | None = None, refresh_s: float = REFRESH_S, limit: int = 50):
        self.store, self.refresh_s, self.limit = RunStore(root), refresh_s, limit
        head = [w.HTML(f"<b>{h}</b>", layout=_cell()) for h in
                ("run", "name", "state", "progress", "step", "loss", "took", "started")]  # fmt: skip
        self._head = head
        self.grid = w.GridBox(head, layout=w.Layout(grid_template_columns=COLUMNS, grid_gap="2px 4px"))
        self.rows: dict[str, _Row] = {}
        self.dashboard: Dashboard | None = None
        self.detail = w.VBox()
        super().__init__([self.grid, self.detail])
        self.add_class("jupyter-llm-runs-table")
        self._closed = False
        self.refresh()
        threading.Thread(target=self._loop, daemon=True, name="jupyter-llm-runs-table").start()

    def refresh(self) -> None:
        data = runs_rows(self.store.list()[::-1][: self.limit])  # newest first
        ids = [r["run_id"] for r in data]
        if ids != list(self.rows):
            self.rows = {i: self.rows.get(i) or _Row(i, self) for i in ids}
            self.grid.children = [*self._head, *(c for row in self.rows.values() for c in row.cells)]
        for r in data:
            self.rows[r["run_id"]].update(r)

    def select(self, run_id: str) -> Dashboard:
        """Open (replace) the dashboard below the table with this run's."""
        if self.dashboard is not None:
            self.dashboard.close()
        self.dashboard = Dashboard(self.store.get(run_id))
        self.detail.children = [self.dashboard]
        for rid, row in self.rows.items():
            row.open.button_style = "info" if rid == run_id else ""
        return self.dashboard

    def _loop(self) -> None:
        while not self._closed:
            time.sleep(self.refresh_s)
            try:
                self.refresh()
            except Exception:  # a folder removed mid-read: the next round sees it gone
                continue

    def close(self) -> None:
        self._closed = True
        if self.dashboard is not None:
            self.dashboard.close()
        super().close()
