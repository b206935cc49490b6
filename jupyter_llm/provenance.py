"""Where a run came from: the versions it ran with and the git commit it was started from."""

from __future__ import annotations

import platform
import subprocess


def versions() -> dict[str, str | None]:
    from importlib import metadata  # lazy: the supervisor's spawner, which the caller waits for, skips it

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("jupyter-llm", "torch", "deepspeed", "transformers", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_sha(cwd: str | None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None
