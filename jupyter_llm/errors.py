"""One exception family for everything jupyter-llm raises on purpose.

User mistakes (a bad spec, an unknown run id) are `UserError`s: the CLI turns them into exit
code 2 with a short message and the magics into `UsageError`, never a traceback.
"""

from __future__ import annotations

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
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
