"""A cgroup v1 memory limit for a test or benchmark (root on these machines): processes
started inside it, and their children, share `limit` bytes; the kernel's OOM killer ends
one that goes past it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def available() -> bool:
    return ROOT.is_dir() and os.access(ROOT, os.W_OK)


@contextmanager
def memory_limit(name: str, limit: int) -> Iterator[Path]:
    """A fresh cgroup `name` limited to `limit` bytes (swap off for it); removed afterwards."""
    path = ROOT / name
    if path.exists():
        _remove(path)
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(limit))
    swap = path / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(limit))
    try:
        yield path
    finally:
        _remove(path)


def enter(path: Path) -> None:
    """Move the calling process into the cgroup (a `preexec_fn` for subprocess)."""
    (path / "cgroup.procs").write_text(str(os.getpid()))


def leave() -> None:
    """Move the calling process back to the root cgroup (what it started inside stays)."""
    (ROOT / "cgroup.procs").write_text(str(os.getpid()))


def oom_kills(path: Path) -> int:
    for line in (path / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def peak(path: Path) -> int:
    return int((path / "memory.max_usage_in_bytes").read_text())


def _remove(path: Path) -> None:
    procs = (path / "cgroup.procs").read_text().split() if path.exists() else []
    for pid in procs:  # whatever is left inside is killed: nothing of a test outlives it
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while path.exists() and time.monotonic() < deadline:
        try:
            path.rmdir()
        except OSError:
            time.sleep(0.2)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
