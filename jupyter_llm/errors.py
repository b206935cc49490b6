"""One exception family for everything jupyter-llm raises on purpose.

User mistakes (a bad spec, an unknown run id) are `UserError`s: the CLI turns them into exit
code 2 with a short message and the magics into `UsageError`, never a traceback.
"""

from __future__ import annotations

import errno
import os
import reprlib
import shutil
from dataclasses import dataclass
from typing import Any


class JupyterLLMError(Exception):
    """Base class of every error jupyter-llm raises deliberately."""


class UserError(JupyterLLMError):
    """Something the user can fix: the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where, what was given, and what is allowed."""

    path: str
    given: Any
    message: str

    def __str__(self) -> str:
        given = _short(self.given)
        return f"{self.path}: {self.message}" + (f" (given: {given})" if given else "")


def _short(value: Any, limit: int = 60) -> str:
    if value is MISSING:
        return ""
    text = _repr.repr(value)  # bounded: a huge or deeply shared value is never expanded whole
    return text if len(text) <= limit else text[: limit - 3] + "..."


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother = 3, 6, 6, 60, 60


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class SpecError(UserError):
    """A spec failed validation; `problems` lists every problem found at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"the spec has {len(problems)} problem(s):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))

    def table(self) -> list[tuple[str, str, str]]:
        """Rows of (field, given, problem) for display."""
        return [(p.path, _short(p.given), p.message) for p in self.problems]


class RunNotFound(UserError):
    """No run matches the id the user gave."""


class RunStateError(UserError):
    """The run is not in a state that allows the requested action."""


class LaunchError(JupyterLLMError):
    """The job could not be started (pre-flight failed, launcher missing, ...)."""


class DiskFull(UserError):
    """The disk holding a run folder has no room for what must be written."""


def free_mb(path: str | os.PathLike[str]) -> float | None:
    """Free space (MB) on the disk holding `path` (its nearest existing parent), or None."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free / 2**20
    except OSError:
        return None


SPACE_MARGIN_MB = 8  # besides a checkpoint: its marker, the events, status and logs


def has_room(path: str | os.PathLike[str], need_mb: float) -> bool:
    """The one rule for "will the next checkpoint fit": free space on the disk holding `path`
    of at least 1.1 × `need_mb` plus SPACE_MARGIN_MB (true when the free space is unknown)."""
    free = free_mb(path)
    return free is None or free >= need_mb * 1.1 + SPACE_MARGIN_MB


def disk_full_message(path: str | os.PathLike[str], what: str, needed_mb: float | None = None) -> str:
    free = free_mb(path)
    have = f"{_mb(free)} MB free" if free is not None else "no space left"
    need = f", {what} needs {_mb(needed_mb)} MB" if needed_mb else f"; cannot write {what}"
    return f"the disk holding {path} is full ({have}{need}); free some space there and try again"


def _mb(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:,.0f}"


def disk_error(path: str | os.PathLike[str], e: OSError, what: str) -> UserError:
    """A UserError for an OSError met writing `what` under `path`: a full disk says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(disk_full_message(path, what))
    return UserError(f"cannot write {what} under {path}: {e.strerror or e}")
