"""The terminal's view of a run (`train --wait`, `resume --wait`, `logs -f`, `prepare --wait`).

On a TTY: one tqdm bar kept at the bottom — the start-up phase until the first metric (preparing
data 45 %, building the model, first step), then step/total, loss, validation loss, tokens/s
and an ETA from the run's own step times; log lines (`logs -f`) print above it. Piped: plain
lines, one per phase change and one per metrics line ("step 20/2000: loss=…, ETA 1m05s"),
so a log file or CI output reads in order. Everything is read from the run folder, as every
other view does, on a thread of its own while the caller follows or waits.
"""

from __future__ import annotations

import os
import threading
from typing import IO, Any

from .files import Tail
from .folder import METRICS_FILE, RunFolder, State
from .summary import eta_s, fmt_duration, metrics_text, prepare_progress, startup, startup_text

POLL_S = 0.5


class TerminalView:
    """`with TerminalView(run, sys.stderr): run.wait()`; `view.write(line)` prints above the bar."""

    def __init__(self, run: RunFolder, stream: IO[str], tty: bool | None = None, metrics: bool = True):
        self.run, self.stream, self.metrics = run, stream, metrics
        self.tty = stream.isatty() if tty is None else tty
        self.prepare = run.status().get("job") == "prepare"
        try:
            self.total: int | None = None if self.prepare else run.spec.train.max_steps
        except Exception:  # a damaged spec.yaml: still follow, without a total
            self.total = None
        self.tail = Tail(run.path / METRICS_FILE)
        self.times: list[tuple[int, float]] = []  # (step, time) of the newest train lines: the ETA
        self.last: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}
        self.phase: str | None = None  # the start-up line shown last
        self.phase_key: str | None = None  # its phase alone: piped output prints one line per phase
        self.bar: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> TerminalView:
        if self.tty:
            from tqdm import tqdm

            try:  # a terminal that says it has no columns (a bare pty) gets 100
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            self.bar = tqdm(total=100 if self.prepare else self.total, file=self.stream, dynamic_ncols=sized,
                            ncols=None if sized else 100, leave=True, unit="step", desc=self._desc(),
                            bar_format="{desc}{percentage:3.0f}%|{bar}|" + ("" if self.prepare else " {n_fmt}/{total_fmt}")
                            + "{postfix}")  # fmt: skip
        self.refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.refresh()  # the last lines written before the end
        if self.bar is not None:
            self.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.refresh()

    def write(self, line: str, file: IO[str] | None = None) -> None:
        """A line above the bar (or simply a line when piped), to `file` (default: the stream)."""
        out = file or self.stream
        with self._lock:
            if self.bar is not None:
                self.bar.write(line, file=out)
                out.flush()
            else:
                print(line, file=out, flush=True)

    # -- reading the folder ---------------------------------------------------------------

    def refresh(self) -> None:
        with self._lock:
            try:
                self._refresh()
            except (OSError, ValueError):  # a file mid-write; the next poll reads it
                pass

    def _refresh(self) -> None:
        if self.prepare:
            return self._refresh_prepare()
        for m in self.tail.read():
            if "loss" in m:
                self.last = m
                self.times = [*self.times[-4:], (int(m["step"]), float(m.get("time", 0)))]
            if "val_loss" in m:
                self.last_val = m
            if self.bar is None and self.metrics:
                print(self._line(m), file=self.stream, flush=True)
        s = startup(self.run)
        phase = startup_text(s) if s else None
        if s and s["phase"] != self.phase_key and self.bar is None:
            print(f"{self.run.id}: {phase}", file=self.stream, flush=True)
        self.phase, self.phase_key = phase, s["phase"] if s else None
        if self.bar is not None:
            self.bar.n = int(self.last.get("step", 0))
            self.bar.set_description_str(self._desc(phase or self.run.state), refresh=False)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.refresh()
        return None

    def _refresh_prepare(self) -> None:
        p = prepare_progress(self.run)
        text = f"{p['phase']} {int(100 * p['fraction'])}%, {p['tokens']:,} tokens"
        if self.bar is not None:
            self.bar.n = int(100 * p["fraction"])
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif p["phase"] != self.phase_key:
            print(f"{self.run.id}: preparing data: {text}", file=self.stream, flush=True)
        self.phase_key = p["phase"]

    def eta_s(self) -> float | None:
        return None if State(self.run.state).terminal else eta_s(self.times, self.total)

    def _line(self, m: dict[str, Any]) -> str:
        where = f"step {m['step']}/{self.total or '?'}"
        if "loss" not in m:
            return f"{where}: " + metrics_text(m)
        eta = self.eta_s()
        return f"{where}: " + metrics_text(m) + (f", ETA {fmt_duration(eta)}" if eta is not None else "")

    def _desc(self, phase: str | None = None) -> str:
        if self.prepare:
            return f"{self.run.name} · preparing data "
        if phase is None:
            s = startup(self.run)
            phase = startup_text(s) if s else self.run.state
        return f"{self.run.name} · {phase} "

    def _postfix(self) -> str:
        parts = []
        if self.last.get("loss") is not None:
            parts.append(f"loss {self.last['loss']:.4g}")
        if self.last_val.get("val_loss") is not None:
            parts.append(f"val {self.last_val['val_loss']:.4g}")
        if self.last.get("tokens_per_s") is not None:
            parts.append(f"{self.last['tokens_per_s']:,.0f} tok/s")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        return " · ".join(parts)
