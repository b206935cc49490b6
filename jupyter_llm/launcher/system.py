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
from pathlib import Path
from typing import Any

import psutil

from ..files import append_jsonl
from ..folder import SYSTEM_FILE

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


class Sampler:
    """`sample(pids)` at most every EVERY_S seconds; CPU percentages are over the interval
    since the previous sample (psutil keeps each process's last reading)."""

    def __init__(self, run_dir: Path, every_s: float = EVERY_S):
        self.path, self.every_s = run_dir / SYSTEM_FILE, every_s
        self.node = socket.gethostname()
        self.procs: dict[int, psutil.Process] = {}
        self.last = 0.0
        psutil.cpu_percent(None)  # the first reading starts the interval

    def sample(self, pids: list[int]) -> dict[str, Any] | None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return None
        self.last = now
        cpu, rss = 0.0, 0.0
        for pid in pids:
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
        append_jsonl(self.path, line)
        return line
