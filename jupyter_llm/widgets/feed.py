"""What changed in a run folder since the last look: new metric and gradient lines (read from
the byte offset where the previous read stopped), the status, and the log tail when the log
grew. Pure file reading, no widgets: the dashboard's background reader polls one per run.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..files import Tail
from ..folder import State
from ..runs import Run
from ..summary import eta_s, startup

LOG_LINES = 400  # the logs tab: the newest lines of rank 0's log, searchable


@dataclass
class Series:
    """A metric's points by step; a step logged again after a resume keeps its newest value."""

    points: dict[int, float] = field(default_factory=dict)
    version: int = 0  # bumped by every change, so a redraw knows whether it is needed

    def add(self, step: int, value: float | None) -> None:
        if value is not None:
            self.points[step] = float(value)
            self.version += 1

    def xy(self) -> tuple[list[int], list[float]]:
        steps = sorted(self.points)
        return steps, [self.points[s] for s in steps]


@dataclass
class Snapshot:
    changed: bool
    status: dict[str, Any]
    last: dict[str, Any]  # newest training metrics line
    last_val: dict[str, Any]  # newest validation line
    grads: dict[str, Any] | None  # newest per-layer gradient norms line
    log: list[str] | None  # the log tail when the log grew, else None
    startup: dict[str, str] | None = None  # the start-up phase until this attempt's first metric
    samples: list[dict[str, Any]] = field(default_factory=list)  # every sample so far (train.sample_every)


class RunFeed:
    KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mem_mb", "mfu")

    def __init__(self, run: Run):
        self.run = run
        self.series: dict[str, Series] = {k: Series() for k in (*self.KEYS, "val_loss")}
        self._tails = {name: Tail(run.path / name)
                       for name in ("metrics.jsonl", "grads.jsonl", "samples.jsonl", "system.jsonl")}  # fmt: skip
        self.system: deque[dict[str, Any]] = deque(maxlen=2000)  # system.jsonl: ~3 h at one line per 5 s
        self.samples: list[dict[str, Any]] = []
        self._log_size = -1
        self._status: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}
        self.grads: dict[str, Any] | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=5)  # (step, time) for the ETA
        self._startup: dict[str, str] | None = None
        self.times: dict[int, float] = {}  # step -> when it was logged (the time axes)
        self.rank_peaks: dict[int, list[float]] = {}  # step -> every rank's memory peak (MB)
        self.rank_peaks_version = 0

    def _read(self, name: str) -> list[dict[str, Any]]:
        return self._tails[name].read()

    def _log_file(self) -> Any:
        rank0 = self.run.path / "logs" / "rank0.log"
        return (rank0, 0) if rank0.exists() else (self.run.path / "logs" / "launcher.log", None)

    def poll(self) -> Snapshot:
        changed = False
        for m in self._read("metrics.jsonl"):
            changed = True
            step = int(m.get("step", 0))
            if "time" in m:
                self.times[step] = float(m["time"])
            if "val_loss" in m:
                self.series["val_loss"].add(step, m["val_loss"])
                self.last_val = m
            else:
                for k in self.KEYS:
                    self.series[k].add(step, m.get(k))
                if m.get("mem_peak_mb_ranks"):
                    self.rank_peaks[step] = [float(v) for v in m["mem_peak_mb_ranks"]]
                    self.rank_peaks_version += 1
                self.last = m
                self._recent.append((step, float(m.get("time", 0.0))))
        if new := self._read("samples.jsonl"):
            changed = True
            self.samples.extend(new)
        if new := self._read("system.jsonl"):
            changed = True
            self.system.extend(new)
        grads = self._read("grads.jsonl")
        if grads:
            changed, self.grads = True, grads[-1]
        status = self.run.status()  # small file; also notices a vanished supervisor
        if status != self._status:
            self._status, changed = status, True
        log = None
        path, rank = self._log_file()
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = -1
        if size != self._log_size:
            self._log_size, changed = size, True
            log = self.run.log_tail(LOG_LINES, rank)
        start = None if State(self._status["state"]).terminal else startup(self.run)
        if start != self._startup:
            self._startup, changed = start, True
        return Snapshot(changed, self._status, self.last, self.last_val, self.grads, log, start, self.samples)

    def eta_s(self, total: int | None) -> float | None:
        """Seconds to `total` steps at the pace of the last few logged steps."""
        return eta_s(list(self._recent), total)
