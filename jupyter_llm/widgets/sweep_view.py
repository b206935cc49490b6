"""`SweepView(sweep)`: the trials table, the optimization history, parameter importances and
the best spec with "Launch best as full run". A background thread re-reads trials.json (the
controller's snapshot) once a second until the sweep ends; importances (Optuna's, from the
study's storage) are recomputed only when the number of completed trials changes."""

from __future__ import annotations

import html
import json
import threading
import time
from typing import Any

import bqplot as bq
import ipywidgets as w
import numpy as np

from ..display import COLORS, TEXT, badge
from ..errors import UserError
from ..runs import Run
from ..sweep import Sweep
from .dashboard import Dashboard

STATE_COLORS = {"COMPLETE": COLORS["completed"], "PRUNED": COLORS["stopped"], "FAIL": COLORS["failed"],
                "RUNNING": COLORS["running"], "WAITING": COLORS["created"]}  # fmt: skip
REFRESH_S = 1.0


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


class SweepView(w.VBox):
    def __init__(self, sweep: Sweep, refresh_s: float = REFRESH_S):
        self.sweep, self.refresh_s = sweep, refresh_s
        self.header, self.table, self.best_html = w.HTML(), w.HTML(), w.HTML()
        x, y = bq.LinearScale(), bq.LinearScale()
        self.points = bq.Scatter(x=np.zeros(0), y=np.zeros(0), scales={"x": x, "y": y}, colors=[COLORS["running"]],
                                 default_size=48, labels=["trial"], display_legend=True)  # fmt: skip
        self.best_line = bq.Lines(x=np.zeros(0), y=np.zeros(0), scales={"x": x, "y": y}, colors=[COLORS["completed"]],
                                  labels=["best so far"], display_legend=True, interpolation="step-after")  # fmt: skip
        metric = sweep.spec.objective.metric
        self.history = bq.Figure(marks=[self.points, self.best_line], title="optimization history",
                                 axes=[bq.Axis(scale=x, label="trial"), bq.Axis(scale=y, side="left", label=metric)],
                                 layout=w.Layout(width="50%", height="280px"))  # fmt: skip
        ox, oy = bq.OrdinalScale(), bq.LinearScale(min=0)
        self.importance_bars = bq.Bars(x=[], y=[], scales={"x": ox, "y": oy}, colors=[COLORS["running"]])
        self.importance = bq.Figure(marks=[self.importance_bars], title="parameter importance",
                                    axes=[bq.Axis(scale=ox), bq.Axis(scale=oy, side="left")],
                                    layout=w.Layout(width="50%", height="280px"))  # fmt: skip
        self.launch_button = w.Button(description="Launch best as full run", icon="rocket", button_style="primary",
                                      disabled=True, layout=w.Layout(width="220px"))  # fmt: skip
        self.launch_button.on_click(lambda _: self.launch_best())
        self.output = w.VBox()
        self.run: Run | None = None
        super().__init__([self.header, w.HBox([self.history, self.importance]), self.table,
                          self.best_html, self.launch_button, self.output])  # fmt: skip
        self.add_class("jupyter-llm-sweep")
        self._completed_seen = -1
        self._closed = False
        self.refresh()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="jupyter-llm-sweep")
        self._thread.start()

    def refresh(self) -> None:
        sw, trials = self.sweep, self.sweep.trials()
        st = sw.status()
        counts: dict[str, int] = {}
        for t in trials:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        self.header.value = (f"<b>sweep {html.escape(sw.id)}</b> {badge(st['state'])} "
                             + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
                             + f" of {sw.spec.trials}"
                             + (f'<div style="color:{TEXT["error"]}">{html.escape(st["error"])}</div>'
                                if st.get("error") else ""))  # fmt: skip
        keys = list(sw.spec.space)
        head = "".join(
            f"<th>{h}</th>" for h in ["#", "state", *keys, sw.spec.objective.metric, "run", "note"]
        )
        rows = []
        for t in trials:
            color = STATE_COLORS.get(t["state"], "#616161")
            note = (f"pruned at step {t['pruned_at_step']}" if t.get("pruned_at_step") is not None and
                    t["state"] == "PRUNED" else (t.get("error") or "")[:120])  # fmt: skip
            rows.append(f'<tr><td>{t["number"]}</td><td style="color:{color}">{t["state"].lower()}</td>'
                        + "".join(f"<td>{_fmt(t['params'].get(k, ''))}</td>" for k in keys)
                        + f"<td>{'' if t['value'] is None else _fmt(t['value'])}</td>"
                        f"<td>{html.escape(t.get('run_id') or '')}</td><td>{html.escape(note)}</td></tr>")  # fmt: skip
        self.table.value = f'<table class="jupyter-llm-trials"><tr>{head}</tr>{"".join(rows)}</table>'
        done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
        xs = np.asarray([t["number"] for t in done], dtype=float)
        ys = np.asarray([t["value"] for t in done], dtype=float)
        best = (
            (np.minimum if sw.spec.objective.direction == "minimize" else np.maximum).accumulate(ys)
            if len(ys)
            else ys
        )
        with self.points.hold_sync(), self.best_line.hold_sync():
            self.points.x, self.points.y = xs, ys
            self.best_line.x, self.best_line.y = xs, best
        b = sw.best()
        self.launch_button.disabled = b is None
        if b is not None:
            self.best_html.value = (f"<b>best</b>: trial {b['number']}, {html.escape(sw.spec.objective.metric)} = "
                                    f"{b['value']:.5g}<pre>{html.escape(json.dumps(b['params'], indent=1))}</pre>")  # fmt: skip
        if len(done) != self._completed_seen and len(done) >= 2:
            self._completed_seen = len(done)
            self._importances()

    def _importances(self) -> None:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            spec = self.sweep.spec
            study = optuna.load_study(study_name=self.sweep.id,
                                      storage=spec.storage or f"sqlite:///{self.sweep.path / 'study.db'}")  # fmt: skip
            imp = optuna.importance.get_param_importances(study)
        except Exception:  # too few distinct values, a storage being written: next time
            return
        with self.importance_bars.hold_sync():
            self.importance_bars.x, self.importance_bars.y = (
                list(imp),
                np.asarray(list(imp.values()), dtype=float),
            )

    def launch_best(self) -> Any:
        """Launch the best trial's spec (with the sweep's `full:` overrides) and show its dashboard."""
        try:
            self.run = self.sweep.launch_best()
        except UserError as e:
            self.output.children = [
                w.HTML(f'<span style="color:{TEXT["error"]}">{html.escape(str(e))}</span>')
            ]
            return None
        self.output.children = [Dashboard(self.run)]
        return self.run

    def _loop(self) -> None:
        while not self._closed:
            time.sleep(self.refresh_s)
            try:
                done = self.sweep.done
                self.refresh()
            except Exception:
                continue
            if done:
                return

    def close(self) -> None:
        self._closed = True
        super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = self.sweep.summary()
        return bundle
