"""`Dashboard(run)`: live curves (bqplot), progress with ETA, state, metrics, gradients, logs,
Stop/Resume; several runs overlaid.

A background thread polls each run's folder (`RunFeed`: only the bytes appended since the last
look) and only assigns widget values, at most once per `interval` seconds; the kernel's main
thread never waits on it. The thread ends when every run has ended and its last state is drawn.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterable
from typing import Any

import bqplot as bq
import ipywidgets as w
import numpy as np

from ..display import PALETTE, TEXT, badge, swatch
from ..errors import UserError
from ..files import read_json
from ..folder import State
from ..runs import Run, RunStore
from ..summary import duration_s, fmt_duration, overview, startup_text
from .feed import RunFeed, Snapshot

INTERVAL_S = 0.5  # at most two redraws a second
# (metric key, figure title, y label)
PANELS = [("lr", "learning rate", "lr"), ("grad_norm", "gradient norm", "norm"),
          ("tokens_per_s", "throughput", "tokens/s"), ("mfu", "model FLOPs utilisation", "% of peak"),
          ("mem_mb", "memory per rank (peak so far)", "MB")]  # fmt: skip
# one format per axis, so ticks never mix 0.001 and 9e-4; SI prefixes for counts (12k tokens/s)
TICK_FORMATS = {"loss": ".3~f", "lr": ".1e", "grad_norm": ".3~g", "tokens_per_s": ".3~s", "mem_mb": ".3~s",
                "mfu": ".3~g"}  # fmt: skip


def _resolve(run: Run | str) -> Run:
    return run if isinstance(run, Run) else RunStore().get(run)


def _figure(key: str, title: str, ylabel: str, height: str = "220px") -> tuple[Any, tuple[Any, Any]]:
    x, y = bq.LinearScale(), bq.LinearScale()
    fig = bq.Figure(
        marks=[], title=title, axes=[bq.Axis(scale=x, label="step", tick_format="~s"),
                                     bq.Axis(scale=y, side="left", label=ylabel, tick_format=TICK_FORMATS.get(key),
                                             label_offset="58px")],  # the label clear of the tick numbers
        fig_margin={"top": 40, "bottom": 40, "left": 80, "right": 20},
        layout=w.Layout(width="auto", height=height), legend_location="top-right",
    )  # fmt: skip
    return fig, (x, y)


def smooth(ys: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start (0 = off)."""
    if weight <= 0 or not ys:
        return ys
    out, avg = [], 0.0
    for i, y in enumerate(ys, 1):
        avg = avg * weight + (1 - weight) * y
        out.append(avg / (1 - weight**i))
    return out


# (title, y label) of the system tab; "gpu": utilisation (ranks line) and memory used (host line)
SYSTEM_PANELS = {"cpu": ("CPU (share of the host's cores)", "%"), "memory": ("host memory", "GiB"),
                 "gpu": ("GPU utilisation (solid) and memory used (dashed)", "%")}  # fmt: skip
X_AXES = {"step": "step", "relative": "minutes since the first point", "wall": "time of day"}


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "–" if v is None else format(v, spec)


class _RunView:
    """The widgets of one run in a dashboard: its header row and its marks in each figure."""

    def __init__(self, run: Run, color: str, dash: Dashboard):
        self.run, self.color, self.feed, self.dash = run, color, RunFeed(run), dash
        self.title = w.HTML()
        self.bar = w.IntProgress(min=0, max=1)
        self.bar_label = w.HTML()
        self.stop = w.Button(description="Stop", icon="stop", layout=w.Layout(width="90px"))
        self.resume = w.Button(description="Resume", icon="play", layout=w.Layout(width="100px"))
        self.stop.on_click(lambda _: dash._act(self, "stop"))
        self.resume.on_click(lambda _: dash._act(self, "resume"))
        # pieces that keep their own line and wrap as wholes at narrow widths (never the badge
        # under the run id, or "ETA" apart from its time)
        self.title.layout = w.Layout(flex="0 0 auto")
        self.bar.layout = w.Layout(flex="1 1 120px", min_width="80px", max_width="420px")
        self.bar_label.layout = w.Layout(flex="0 1 auto")
        self.header = w.HBox([self.title, self.bar, self.bar_label, self.stop, self.resume],
                             layout=w.Layout(align_items="center", flex_flow="row wrap"))  # fmt: skip
        name = run.name
        self.loss = bq.Lines(x=np.zeros(0), y=np.zeros(0), colors=[color], labels=[f"{name} train"],
                             scales={"x": dash._scales["loss"][0], "y": dash._scales["loss"][1]},
                             display_legend=True, stroke_width=2)  # fmt: skip
        self.val = bq.Lines(x=np.zeros(0), y=np.zeros(0), colors=[color], labels=[f"{name} val"],
                            scales={"x": dash._scales["loss"][0], "y": dash._scales["loss"][1]},
                            display_legend=True, line_style="dashed", marker="circle", marker_size=24)  # fmt: skip
        self.panels = {key: bq.Lines(x=np.zeros(0), y=np.zeros(0), colors=[color], labels=[name],
                                     scales={"x": dash._scales[key][0], "y": dash._scales[key][1]},
                                     display_legend=True)
                       for key, _, _ in PANELS}  # fmt: skip
        # system utilisation (system.jsonl): the ranks' share solid, the whole host dashed
        self.system = {key: [bq.Lines(x=np.zeros(0), y=np.zeros(0), colors=[color], labels=[f"{name} {what}"],
                                      scales={"x": dash._sys_scales[key][0], "y": dash._sys_scales[key][1]},
                                      display_legend=True, line_style=style)
                             for what, style in (("ranks", "solid"), ("host", "dashed"))]
                       for key in SYSTEM_PANELS}  # fmt: skip
        self.system_drawn = 0
        self.snap: Snapshot | None = None
        self.log_text = ""
        self.drawn: dict[str, int] = {}  # series version last drawn, per metric

    def draw(self, snap: Snapshot) -> None:
        self.snap = snap
        st, feed = snap.status, self.feed
        for line, key in [(self.loss, "loss"), (self.val, "val_loss")] + [
            (m, k) for k, m in self.panels.items()
        ]:
            series = feed.series[key]
            if self.drawn.get(key) != series.version:
                self.drawn[key] = series.version
                xs, ys = series.xy()
                if key == "mfu":
                    ys = [100 * y for y in ys]
                    if ys:
                        self.dash.figures["mfu"].layout.display = None
                if key == "mem_mb" and feed.rank_peaks:
                    continue  # drawn per rank below
                with line.hold_sync():
                    line.x = self.dash.x_values(feed, xs)
                    line.y = np.asarray(
                        ys if key == "val_loss" else smooth(ys, self.dash.smoothing), dtype=float
                    )
        if feed.rank_peaks and self.drawn.get("rank_peaks") != feed.rank_peaks_version:
            self.drawn["rank_peaks"] = feed.rank_peaks_version
            steps = sorted(feed.rank_peaks)
            n = max(len(v) for v in feed.rank_peaks.values())
            rows = [
                [feed.rank_peaks[s][r] if r < len(feed.rank_peaks[s]) else np.nan for s in steps]
                for r in range(n)
            ]
            line = self.panels["mem_mb"]
            with line.hold_sync():
                line.x, line.y = self.dash.x_values(feed, steps), np.asarray(rows, dtype=float)
                line.labels = [f"{self.run.name} rank {r}" for r in range(n)]
                line.colors = [self.color] * n
                line.opacities = [max(0.35, 1 - 0.2 * r) for r in range(n)]
        if len(feed.system) != self.system_drawn:
            self.system_drawn = len(feed.system)
            self._draw_system(list(feed.system))
        total = self._total()
        step = int(snap.last.get("step", 0))
        with self.bar.hold_sync():
            self.bar.max = max(1, total or 1)
            self.bar.value = min(step, self.bar.max)
            self.bar.bar_style = {"completed": "success", "failed": "danger", "stopped": "warning"}.get(
                st["state"], "info"
            )
        pct = int(100 * step / total) if total else 0
        eta = feed.eta_s(total) if not State(st["state"]).terminal else None
        if snap.startup is not None:  # until the first metric: what it is doing instead of empty charts
            text = f'<span class="jupyter-llm-startup">{html.escape(startup_text(snap.startup))}</span>'
        else:
            text = f"step {step}/{total or '?'} ({pct}%)"
            if eta is not None:
                text += f" · ETA {fmt_duration(eta)}"
            elif State(st["state"]).terminal and (took := duration_s(st)) is not None:
                text += f" · took {fmt_duration(took)}"
        self.bar_label.value = f'<span style="white-space:nowrap">{text}</span>'
        shown = st["state"] if snap.startup is None else snap.startup["phase"]
        self.title.value = (f'<span style="white-space:nowrap">{swatch(self.color)} '
                            f'<b>{html.escape(self.run.id)}</b> <span class="jupyter-llm-state" '
                            f'data-state="{html.escape(st["state"])}">{badge(shown, st["state"])}</span></span>')  # fmt: skip
        terminal = State(st["state"]).terminal
        self.stop.disabled = terminal
        self.resume.disabled = not terminal or st["state"] == State.COMPLETED.value

    def _draw_system(self, lines: list[dict[str, Any]]) -> None:
        t0 = lines[0]["time"] if lines else 0.0
        x = np.asarray([(ln["time"] - t0) / 60 for ln in lines], dtype=float)
        cpus = [max(1, int(ln.get("cpus", 1))) for ln in lines]
        values = {
            "cpu": ([ln["ranks_cpu_pct"] / n for ln, n in zip(lines, cpus, strict=True)], [ln["cpu_pct"] for ln in lines]),
            "memory": ([ln["ranks_rss_mb"] / 1024 for ln in lines], [ln["mem_used_mb"] / 1024 for ln in lines]),
            "gpu": ([sum(g["util_pct"] for g in ln["gpus"]) / max(1, len(ln["gpus"])) for ln in lines],
                    [sum(g["mem_used_mb"] for g in ln["gpus"]) / max(1.0, sum(g["mem_total_mb"] for g in ln["gpus"])) * 100
                     for ln in lines]),
        }  # fmt: skip
        for key, (ranks, host) in values.items():
            for line, ys in zip(self.system[key], (ranks, host), strict=True):
                with line.hold_sync():
                    line.x, line.y = x, np.asarray(ys, dtype=float)
        self.dash.show_gpu(any(ln["gpus"] for ln in lines))

    def _total(self) -> int | None:
        try:
            return int(self.run.spec.train.max_steps)
        except Exception:
            return None

    def _estimate_mb(self) -> float | None:
        """The per-rank estimate the launch chose by (fit.json, a launch that fitted itself)."""
        if not hasattr(self, "_estimate"):
            plan = read_json(self.run.path / "fit.json") or {}
            chosen = next((c for c in plan.get("candidates", []) if c.get("chosen")), None)
            gpu = bool((plan.get("resources") or {}).get("gpu_free"))
            self._estimate = None if chosen is None else 1024 * (
                chosen["device_gib"] if gpu else chosen["device_gib"] + chosen["host_gib"])  # fmt: skip
        return self._estimate

    def stats_row(self) -> str:
        snap = self.snap
        if snap is None:
            return ""
        m, v = snap.last, snap.last_val
        if m.get("mfu") is not None:
            mfu = f"{100 * m['mfu']:.1f}% of {m['peak_flops'] / 1e12:.0f} TFLOP/s"
        else:
            # short in the cell; why, on hover
            mfu = '<span title="no peak FLOP/s is known for this device">n/a</span>' if m else "–"
        mem = "–" if m.get("mem_mb") is None else f"{m['mem_mb']:,.0f} MB " + (
            "device peak" if m.get("mem_kind") == "device_peak" else "RSS")  # fmt: skip
        if m.get("mem_peak_mb") is not None:
            est = self._estimate_mb()
            mem += f"; peak {m['mem_peak_mb']:,.0f} MB" + (
                "" if est is None else f" of {est:,.0f} MB estimated"
            )
        cells = [html.escape(self.run.name), _fmt(m.get("loss")), _fmt(v.get("val_loss")), _fmt(m.get("lr"), ".3g"),
                 _fmt(m.get("grad_norm"), ".3g"), _fmt(m.get("tokens_per_s"), ",.0f"), mfu, mem]  # fmt: skip
        err = snap.status.get("error")
        row = "".join(f"<td>{c}</td>" for c in cells)
        if err:
            row += f'<td style="color:{TEXT["error"]}">{html.escape(str(err))}</td>'
        if snap.status.get("restarts"):
            last = (snap.status.get("last_restart") or {}).get("reason", "")
            row += f'<td title="{html.escape(str(last))}">restarted {snap.status["restarts"]}×</td>'
        return f"<tr>{row}</tr>"


class Dashboard(w.VBox):
    """Live view of one run or several overlaid: `Dashboard(run)`, `Dashboard([a, b])`, `.add(c)`."""

    def __init__(self, runs: Run | str | Iterable[Run | str], interval: float = INTERVAL_S):
        self.interval = interval
        self._scales: dict[str, tuple[Any, Any]] = {}
        self.figures: dict[str, Any] = {}
        for key, title, ylabel, height in [
            ("loss", "loss", "loss", "300px"),
            *[(*p, "220px") for p in PANELS],
        ]:
            self.figures[key], self._scales[key] = _figure(key, title, ylabel, height)
        self.loss_figure = self.figures["loss"]
        self._sys_scales: dict[str, tuple[Any, Any]] = {}
        self.system_figures: dict[str, Any] = {}
        for key, (title, ylabel) in SYSTEM_PANELS.items():
            fig, self._sys_scales[key] = _figure(key, title, ylabel, "220px")
            fig.axes[0].label = "minutes since the first sample"
            self.system_figures[key] = fig
        self.system_figures["gpu"].layout.display = "none"  # shown where there are GPUs
        self.figures["mfu"].layout.display = "none"  # shown once a run logs MFU (a GPU with a known peak)
        self.system_note = w.HTML(
            "<i>sampled every 5 s per node by the supervisor and the nodes' agents (system.jsonl)</i>"
        )
        self.grad_bars = bq.Bars(x=[], y=[], scales={"x": bq.OrdinalScale(), "y": bq.LinearScale()},
                                 colors=[PALETTE[0]])  # fmt: skip
        self.grad_figure = bq.Figure(
            marks=[self.grad_bars], title="per-layer gradient norm",
            axes=[bq.Axis(scale=self.grad_bars.scales["x"], tick_rotate=-30),
                  bq.Axis(scale=self.grad_bars.scales["y"], side="left", tick_format=".3g")],
            fig_margin={"top": 40, "bottom": 90, "left": 60, "right": 20},
            layout=w.Layout(width="100%", height="280px"),
        )  # fmt: skip
        self.grad_note = w.HTML("<i>set train.grad_norms_every to log per-layer gradient norms</i>")
        self.grad_figure.layout.display = "none"  # shown once a run logs gradient norms
        self.stats = w.HTML()
        self.logs = w.HTML()
        self.log_search = w.Text(
            placeholder="search the log (case-insensitive)", layout=w.Layout(width="100%")
        )
        self.log_search.observe(lambda _: self._draw_logs(), names="value")
        self.samples = w.HTML("<i>set train.sample_every to generate samples while training</i>")
        self.overview = w.HTML()
        self._overview_key: tuple[Any, ...] = ()
        self.message = w.HTML()
        self.headers = w.VBox()
        # TensorBoard's controls: smoothing, a log-scale loss, and x as step, relative or wall time
        self.smoothing = 0.0
        self.x_axis = "step"
        self.smooth_slider = w.FloatSlider(value=0.0, min=0.0, max=0.99, step=0.01, description="smoothing",
                                           tooltip="an exponential moving average of the training curves",
                                           layout=w.Layout(width="260px"))  # fmt: skip
        self.x_choice = w.Dropdown(options=[("step", "step"), ("relative time", "relative"), ("wall time", "wall")],
                                   value="step", description="x axis", layout=w.Layout(width="220px"))  # fmt: skip
        self.log_loss = w.Checkbox(value=False, description="log-scale loss", indent=False,
                                   layout=w.Layout(width="140px"))  # fmt: skip
        for control in (self.smooth_slider, self.x_choice, self.log_loss):
            control.observe(lambda _: self._controls_changed(), names="value")
        self.controls = w.HBox([self.x_choice, self.smooth_slider, self.log_loss],
                               layout=w.Layout(flex_flow="row wrap", align_items="center"))  # fmt: skip
        self._x_scales = {key: {"step": self._scales[key][0], "relative": bq.LinearScale(), "wall": bq.DateScale()}
                          for key in self.figures}  # fmt: skip
        self._y_scales = {"linear": self._scales["loss"][1], "log": bq.LogScale()}
        # six tabs: their titles fit a 460-px notebook (the per-layer norms sit under the global one)
        tabs = w.Tab(children=[w.VBox([*(self.figures[k] for k, _, _ in PANELS[:2]), self.grad_note, self.grad_figure]),
                               w.VBox([self.figures[k] for k, _, _ in PANELS[2:]]), self.samples,
                               w.VBox([self.log_search, self.logs]),
                               w.VBox([self.system_note, *self.system_figures.values()]), self.overview])  # fmt: skip
        for i, title in enumerate(["lr · grad", "speed", "samples", "logs", "system", "overview"]):
            tabs.set_title(i, title)
        super().__init__([self.headers, self.stats, self.controls, self.loss_figure, tabs, self.message])
        self.add_class("jupyter-llm-dashboard")
        self.views: list[_RunView] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        for r in [runs] if isinstance(runs, Run | str) else runs:
            self.add(r)

    # -- runs -----------------------------------------------------------------------------

    def add(self, run: Run | str) -> Dashboard:
        """Overlay another run (its curves in its own colour)."""
        view = _RunView(_resolve(run), PALETTE[len(self.views) % len(PALETTE)], self)
        with self._lock:
            self.views.append(view)
            self.loss_figure.marks = [m for v in self.views for m in (v.loss, v.val)]
            for key, _, _ in PANELS:
                self.figures[key].marks = [v.panels[key] for v in self.views]
            for key, fig in self.system_figures.items():
                fig.marks = [m for v in self.views for m in v.system[key]]
            self.headers.children = [v.header for v in self.views]
        self.refresh()
        if self.x_axis != "step" or self.log_loss.value:  # the new run's marks on the chosen axes
            self._controls_changed()
        self._start()
        return self

    @property
    def runs(self) -> list[Run]:
        return [v.run for v in self.views]

    # -- updates --------------------------------------------------------------------------

    def show_gpu(self, shown: bool) -> None:
        self.system_figures["gpu"].layout.display = None if shown else "none"

    def x_values(self, feed: RunFeed, steps: list[int]) -> Any:
        """The x of each point in the chosen axis: its step, minutes since the run's first
        point, or the wall-clock time it was logged."""
        if self.x_axis == "step":
            return np.asarray(steps, dtype=float)
        times = [feed.times.get(s, np.nan) for s in steps]
        if self.x_axis == "wall":
            return np.array(
                [np.datetime64(int(t * 1000), "ms") if t == t else np.datetime64("NaT") for t in times]
            )
        t0 = min(feed.times.values(), default=0.0)
        return (np.asarray(times, dtype=float) - t0) / 60

    def _controls_changed(self) -> None:
        with self._lock:
            self.smoothing, self.x_axis = float(self.smooth_slider.value), str(self.x_choice.value)
            for key, fig in self.figures.items():
                scale = self._x_scales[key][self.x_axis]
                for mark in fig.marks:
                    mark.scales = {**mark.scales, "x": scale}
                fig.axes[0].scale, fig.axes[0].label = scale, X_AXES[self.x_axis]
                fig.axes[0].tick_format = "%H:%M:%S" if self.x_axis == "wall" else "~s"
            y = self._y_scales["log" if self.log_loss.value else "linear"]
            for mark in self.loss_figure.marks:
                mark.scales = {**mark.scales, "y": y}
            self.loss_figure.axes[1].scale = y
            for v in self.views:
                v.drawn = {}
                if v.snap is not None:
                    v.draw(v.snap)

    def refresh(self) -> bool:
        """Read what is new in every run folder and redraw; True if anything changed."""
        with self._lock:
            changed = False
            for v in self.views:
                snap = v.feed.poll()
                if snap.changed or v.snap is None:
                    v.draw(snap)
                    changed = True
            if changed:
                self._draw_shared()
            return changed

    def _draw_shared(self) -> None:
        head = "".join(f"<th>{h}</th>" for h in
                       ("run", "loss", "val loss", "lr", "grad norm", "tokens/s", "MFU", "memory"))  # fmt: skip
        self.stats.value = f'<table class="jupyter-llm-stats"><tr>{head}</tr>{"".join(v.stats_row() for v in self.views)}</table>'
        first = self.views[0].snap if self.views else None
        if first is not None and first.grads:
            norms = first.grads["norms"]
            with self.grad_bars.hold_sync():
                self.grad_bars.x, self.grad_bars.y = (
                    list(norms),
                    np.asarray(list(norms.values()), dtype=float),
                )
            self.grad_note.value = f"{html.escape(self.views[0].run.name)}, step {first.grads['step']}"
            self.grad_figure.layout.display = None
        for v in self.views:
            if v.snap is not None and v.snap.log is not None:
                v.log_text = "\n".join(v.snap.log)
        self._draw_logs()
        self._draw_samples()
        key = tuple((v.run.id, v.snap.status.get("state") if v.snap else None) for v in self.views)
        if key != self._overview_key:  # again when a run changes state, not at every metrics line
            self._overview_key = key
            self._draw_overview()

    def _draw_overview(self) -> None:
        self.overview.value = "".join(
            f"<h4>{swatch(v.color)} {html.escape(v.run.name)}</h4><table class='jupyter-llm-overview'>"
            + "".join(f"<tr><th style='text-align:left;vertical-align:top'>{html.escape(k)}</th>"
                      f"<td style='word-break:break-word'>{html.escape(val)}</td></tr>" for k, val in overview(v.run))
            + "</table>"
            for v in self.views
        )  # fmt: skip

    def _draw_logs(self) -> None:
        """Rank 0's newest log lines of each run (the worker's step lines among them), wrapped;
        only the lines holding the search text when there is one."""
        needle = self.log_search.value.strip().lower()
        out = []
        for v in self.views:
            lines = v.log_text.splitlines()
            shown = [ln for ln in lines if needle in ln.lower()] if needle else lines
            note = f" · {len(shown)} of {len(lines)} lines hold “{html.escape(needle)}”" if needle else ""
            out.append(f"<b>{html.escape(v.run.id)}</b>{note}<pre style='font-size:85%;line-height:1.2;"
                       f"white-space:pre-wrap;word-break:break-word'>{html.escape(chr(10).join(shown))}</pre>")  # fmt: skip
        self.logs.value = "".join(out)

    def _draw_samples(self) -> None:
        rows = [(v, s) for v in self.views if v.snap is not None for s in v.snap.samples]
        if not rows:
            return
        body = "".join(
            f"<tr><td>{swatch(v.color)} {html.escape(v.run.name)}</td><td>{s['step']}</td>"
            f"<td>{html.escape(s['prompt'])}</td><td style='white-space:pre-wrap'>{html.escape(s['output'])}</td></tr>"
            for v, s in sorted(rows, key=lambda r: (-int(r[1]["step"]), r[0].run.id))
        )  # fmt: skip
        self.samples.value = (f"<table class='jupyter-llm-samples'><tr><th>run</th><th>step</th><th>prompt</th>"
                              f"<th>generated (greedy)</th></tr>{body}</table>")  # fmt: skip

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, daemon=True, name="jupyter-llm-dashboard")
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            t0 = time.monotonic()
            try:
                self.refresh()
            except Exception as e:  # a vanished folder must not kill the kernel's thread noisily
                self.message.value = f'<span style="color:{TEXT["error"]}">{html.escape(str(e))}</span>'
                return
            if all(v.snap is not None and State(v.snap.status["state"]).terminal for v in self.views):
                return  # the final state is drawn
            time.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    @property
    def live(self) -> bool:
        """Whether the background reader is still following a run."""
        return self._thread is not None and self._thread.is_alive()

    def _act(self, view: _RunView, action: str) -> None:
        try:
            if action == "stop":
                self.message.value = f"{html.escape(view.run.id)}: {html.escape(view.run.stop())}"
            else:
                view.run.resume()
                self.message.value = f"{html.escape(view.run.id)}: resuming"
        except UserError as e:
            self.message.value = f'<span style="color:{TEXT["error"]}">{html.escape(str(e))}</span>'
        self.refresh()
        self._start()

    def close(self) -> None:
        self._closed = True
        super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = "\n".join(v.run.summary() for v in self.views) or "Dashboard (no runs)"
        return bundle
