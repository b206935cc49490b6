"""System utilisation while a run trains, the question nvdashboard answers: every few seconds
the supervisor (or a node's agent) appends one line per node to RUN/system.jsonl — the host's
CPU and memory, its ranks' CPU and resident memory, and each visible GPU's utilisation and
memory (nvidia-smi, when there is one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ..files import append_jsonl
from ..folder import SYSTEM_FILE

SYSTEM_MARK = "JUPYTER_LLM_NODE_SYSTEM"  # a node agent's line on its ssh output: one sample
EVERY_S = float(os.environ.get("JUPYTER_LLM_SYSTEM_EVERY_S", "5"))  # tests sample every second
NVIDIA_SMI_TIMEOUT_S = 5.0


def gpus() -> list[dict[str, float]]:
    """Each visible GPU's utilisation (%) and memory (MB), from nvidia-smi; [] without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        try:
            i, util, used, total = (float(x) for x in line.split(","))
        except ValueError:  # "[N/A]" on some boards
            continue
        rows.append({"index": int(i), "util_pct": util, "mem_used_mb": used, "mem_total_mb": total})
    return rows


def rank_pids(records: dict[int, dict[str, Any]]) -> list[int]:
    """The rank processes of `watch.rank_records(...)`."""
    return [int(r["pid"]) for r in records.values() if r.get("pid")]


class Sampler:
    """`sample(pids)` at most every EVERY_S seconds; CPU percentages are over the interval
    since the previous sample (psutil keeps each process's last reading)."""

    def __init__(self, run_dir: Path, every_s: float = EVERY_S, node: str | None = None,
                 sink: Callable[[dict[str, Any]], None] | None = None):  # fmt: skip
        """`sink`: where each line goes instead of RUN/system.jsonl (a node's agent says it to
        the supervisor, which writes it here)."""
        self.path, self.every_s, self.sink = run_dir / SYSTEM_FILE, every_s, sink
        self.node = node or socket.gethostname()
        self.procs: dict[int, psutil.Process] = {}
        self.last = 0.0
        psutil.cpu_percent(None)  # the first reading starts the interval

    def sample(self, pids: Callable[[], list[int]]) -> dict[str, Any] | None:
        """`pids()` (the ranks' processes) is asked only when a sample is due: a caller polling
        four times a second reads the rank records once every EVERY_S."""
        now = time.monotonic()
        if now - self.last < self.every_s:
            return None
        self.last = now
        cpu, rss = 0.0, 0.0
        for pid in pids():
            proc = self.procs.get(pid)
            try:
                if proc is None:  # its CPU share counts from the next sample (psutil's interval)
                    proc = self.procs[pid] = psutil.Process(pid)
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss / 2**20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self.procs.pop(pid, None)
        mem = psutil.virtual_memory()
        line = {"time": time.time(), "node": self.node, "cpu_pct": psutil.cpu_percent(None),
                "cpus": psutil.cpu_count() or 1, "mem_used_mb": (mem.total - mem.available) / 2**20,
                "mem_total_mb": mem.total / 2**20, "ranks_cpu_pct": cpu, "ranks_rss_mb": rss, "gpus": gpus()}  # fmt: skip
        if self.sink is not None:
            self.sink(line)
        else:
            append_jsonl(self.path, line)
        return line


def collect(log: Path, offset: int, run_dir: Path) -> int:
    """The agents' SYSTEM lines appended to a node's log since `offset`, copied into
    RUN/system.jsonl; returns the new offset (a line cut short waits for the next call)."""
    import json

    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return offset
    end = data.rfind(b"\n") + 1
    for raw in data[:end].splitlines():
        if raw.startswith(SYSTEM_MARK.encode() + b" "):
            try:
                append_jsonl(run_dir / SYSTEM_FILE, json.loads(raw.split(b" ", 1)[1]))
            except ValueError:
                continue
    return offset + end
