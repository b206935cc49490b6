"""Detached single-process jobs (evaluations, the sweep controller): starting and reading them.

`python -m MODULE FOLDER --detach` forks: the parent records the child's pid in
FOLDER/status.json (state `starting`) and exits at once, so the caller has no child to reap and
sees the pid as soon as it returns; the child waits for that record, starts a session of its
own and writes its output to FOLDER/LOG.
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import read_json, write_json_atomic
from .folder import STATUS_FILE, JobFolder


def detach(folder: Path, log: str) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        import psutil

        st = read_json(folder / STATUS_FILE) or {}
        write_json_atomic(folder / STATUS_FILE,
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


class DetachedJob(JobFolder):
    """Reader of a folder whose detached process reports its own state in status.json
    (created → starting → running → completed | failed | stopped); the same reader as a run
    folder's (folder.JobFolder: status, lost-process detection, wait)."""
