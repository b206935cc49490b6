"""Detached single-process jobs (evaluations, the sweep controller): starting and reading them.

`python -m MODULE FOLDER --detach` forks: the parent records the child's pid in
FOLDER/status.json (state `starting`) and exits at once, so the caller has no child to reap and
sees the pid as soon as it returns; the child waits for that record, starts a session of its
own and writes its output to FOLDER/LOG.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .files import process_alive, read_json, write_json_atomic


def detach(folder: Path, log: str) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        import psutil

        st = read_json(folder / "status.json") or {}
        write_json_atomic(folder / "status.json",
                          {**st, "state": "starting", "pid": pid, "pid_create_time": psutil.Process(pid).create_time()})  # fmt: skip
        os.close(w)
        os._exit(0)
    os.close(w)
    os.read(r, 1)  # returns once the parent has written the status (and exited)
    os.close(r)
    os.setsid()
    fd = os.open(folder / log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class DetachedJob:
    """Reader of a folder whose detached process reports its own state in status.json
    (created → starting → running → completed | failed | stopped). A job that reads as live
    while its recorded process is gone is reported failed with `lost: true`."""

    TERMINAL = ("completed", "failed", "stopped")
    what = "job process"  # named in the message of a lost job
    hint = ""  # what to do about a lost job

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.id = self.path.name

    def status_raw(self) -> dict[str, Any]:
        return read_json(self.path / "status.json") or {"state": "created"}

    def status(self) -> dict[str, Any]:
        st = self.status_raw()
        if st["state"] not in (*self.TERMINAL, "created") and not self.alive(st):
            st = {**st, "state": "failed", "lost": True,
                  "error": st.get("error") or f"the {self.what} (pid {st.get('pid')}) is gone{self.hint}"}  # fmt: skip
        return st

    @staticmethod
    def alive(st: dict[str, Any]) -> bool:
        return process_alive(st.get("pid"), st.get("pid_create_time"))

    @property
    def state(self) -> str:
        return str(self.status()["state"])

    @property
    def done(self) -> bool:
        return self.state in self.TERMINAL

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.state) not in self.TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.id} still {state} after {timeout} s")
            time.sleep(poll)
        return state
