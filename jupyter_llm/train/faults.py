"""Fault injection for tests, read from JUPYTER_LLM_FAULT (several with commas, e.g.
`startup_delay_ms:6000,step_delay_ms:100`): in the ranks hang_at_step:N, raise_at_step:N (an
exception in the loss, on rank 0), step_delay_ms:N and startup_delay_ms:N; in the playground's
generator token_delay_ms:N. A run or a generation a test must catch mid-flight is held there
instead of raced."""

from __future__ import annotations

import os


def fault(name: str) -> int | None:
    """The number given for `name` in JUPYTER_LLM_FAULT, or None when it is not set."""
    for item in os.environ.get("JUPYTER_LLM_FAULT", "").split(","):
        kind, _, arg = item.strip().partition(":")
        if kind == name and arg.isdigit():
            return int(arg)
    return None
