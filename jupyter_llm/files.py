"""The run folder's file primitives: atomic JSON writes, single-write JSONL appends, tolerant
readers, and the liveness test for a recorded process. The bottom layer: it imports nothing
of this package, so every writer (kernel, CLI, supervisor, ranks) shares the same rules.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def size_text(n_bytes: float | None) -> str:
    """A size a person reads at a glance: 512 B, 14.3 MiB, 2.05 GiB (binary units)."""
    if n_bytes is None:
        return "?"
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def gib_text(gib: float) -> str:
    """`size_text` of a size given in GiB (the estimators' unit)."""
    return size_text(gib * 1024**3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave the old file and no temporary one
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line with a single write (O_APPEND), so concurrent appenders never interleave."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete line.

    A half-written last line (a writer mid-append) is left for the next read.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for raw in data[:end].splitlines():
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer; skip it
    return out, offset + end


class Tail:
    """The one JSONL tailer: each read() returns the complete lines appended since the last
    (a byte offset is kept; a half-written last line waits for the next read); a file replaced
    or truncated is read again from the start. Not thread-safe on its own."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = path, 0, -1

    def read(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.restarted = self.restarted or self.inode != -1
            self.offset, self.inode = 0, -1
            return []
        if self.inode != -1 and (st.st_ino != self.inode or st.st_size < self.offset):
            self.offset, self.restarted = 0, True
        self.inode = st.st_ino
        if st.st_size <= self.offset:
            return []
        lines, self.offset = read_jsonl(self.path, self.offset)
        return lines

    restarted = False  # a read started over (the file was replaced or removed); callers reset it


_seen: dict[str, tuple[Tail, list[dict[str, Any]]]] = {}  # path -> (its tail, every line so far)
_seen_lock = threading.Lock()


def appended_lines(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's lines, reading only what was appended since this process last read it
    (the runs table, the sidebar's API and `%llm_runs` poll every run's metrics every few
    seconds); a replaced or truncated file is read again from the start."""
    key = str(path)
    with _seen_lock:
        tail, lines = _seen.get(key) or (Tail(path), [])
        new = tail.read()
        if tail.restarted:
            tail.restarted, lines = False, []
        lines = lines + new
        _seen[key] = (tail, lines)
        return list(lines)


def last_jsonl(path: Path, nbytes: int = 64 * 1024) -> list[dict[str, Any]]:
    """The complete lines among the last `nbytes` of a JSONL file (the newest records, without
    reading a long file whole); [] when it is missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            start = max(0, fh.tell() - nbytes)
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return []
    if start:  # the first line may be cut: it starts after the first newline
        data = data[data.find(b"\n") + 1 :]
    out = []
    for raw in data.splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:  # a line being written
            continue
    return out


def tree_mb(path: Path) -> float:
    """The size (MB) of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """Is `pid` running and (when given) the same process that was recorded?"""
    if not pid:
        return False
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except psutil.Error:
        return False
