"""What every supervisor (this machine's, a node's agent, the cluster side) knows about an
attempt's ranks: their own records, the first one that died, why the job failed, the stop
ladder's waits, and the processes an earlier attempt left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ..errors import disk_full_message
from ..files import process_alive, read_json

SIGINT_WAIT_S = 10.0  # after SIGINT, before SIGTERM
SIGTERM_WAIT_S = 5.0  # after SIGTERM, before SIGKILL


class Failure(BaseModel):
    """Why an attempt failed, as fields (status.json's `failure`); `error` is the sentence
    derived from them. cause: exception (a rank's own), vanished (a rank gone without a record:
    SIGKILL, the OOM killer, a segfault), launcher (nothing of the ranks says more), disk_full
    (a rank could not write: no space left on the disk holding the run folder)."""

    cause: Literal["exception", "vanished", "launcher", "disk_full"]
    rank: int | None = None
    node: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    type: str | None = None  # the exception's class
    message: str | None = None

    def sentence(self) -> str:
        how = f" (killed by {self.signal})" if self.signal else (
            f" (exit code {self.exit_code})" if self.exit_code is not None else "")  # fmt: skip
        if self.cause == "disk_full":
            return f"rank {self.rank}: {self.message}"
        if self.cause == "exception":
            return f"rank {self.rank} failed: {self.type}: {self.message}".strip()
        if self.cause == "vanished":
            return f"rank {self.rank} (pid {self.pid}) died without an error{how}; the others were stopped"
        return f"the DeepSpeed launcher exited with code {self.exit_code}{'' if not self.signal else how}; see logs/"


# exceptions of the machinery between ranks, not of the user's code or data: worth a restart
_INFRA_TYPES = {"DistBackendError", "DistNetworkError", "DistStoreError", "ConnectionError",
                "ConnectionResetError", "ConnectionRefusedError", "BrokenPipeError", "TimeoutError"}  # fmt: skip
_INFRA_WORDS = ("timed out", "timeout", "connection reset", "connection refused", "connection closed",
                "broken pipe", "nccl error", "gloo")  # fmt: skip


def retryable(failure: dict[str, Any] | None, hung: bool = False) -> tuple[bool, str]:
    """Is the failure of an attempt the infrastructure's (restart from the newest checkpoint)
    or the user's (no retry)? Returns the decision and the class, in words."""
    if hung:
        return True, "infrastructure: no progress (a hang)"
    f = failure or {}
    cause = f.get("cause")
    if cause == "vanished":
        return (
            True,
            f"infrastructure: rank {f.get('rank')} was killed ({f.get('signal') or 'no error of its own'})",
        )
    if cause == "launcher":
        return True, "infrastructure: the launcher failed with no rank error"
    if cause == "disk_full":
        return True, "infrastructure: the disk was full (retried only once there is room)"
    if cause == "exception":
        text = f"{f.get('message') or ''}".lower()
        if f.get("type") in _INFRA_TYPES or any(w in text for w in _INFRA_WORDS):
            return True, f"infrastructure: {f.get('type')} between ranks"
        return (
            False,
            f"user error: {f.get('type')} in rank {f.get('rank')} (a restart would fail the same way)",
        )
    return False, "not a failure of the job (no retry)"


def diagnose(
    run_dir: Path, attempt: int, rc: int, first_dead: dict[str, Any] | None, log_lines: list[str]
) -> Failure:
    """Name the rank that failed first and why.

    When one rank dies the others fail too (a broken collective, or the launcher's
    SIGTERM); those are collateral. The cause is, in order: a rank's own exception; a
    rank that vanished without a record (SIGKILL, OOM killer, segfault); a
    communication error; the launcher's exit code. `log_lines`: the launcher's output.
    """
    ranks = rank_records(run_dir, attempt)
    fails = {}
    for f in (run_dir / "failures").glob("rank*.json"):
        info = read_json(f)
        if info and info.get("attempt") == attempt:
            fails[info["rank"]] = info
    codes = [ln for ln in log_lines if "exits with return code" in ln]
    code = codes[-1].rsplit("=", 1)[-1].strip() if codes else None
    exit_code = int(code) if code and code.lstrip("-").isdigit() else None
    sig = signal.Signals(-exit_code).name if exit_code is not None and exit_code < 0 else None

    def raised(f: dict[str, Any]) -> Failure:
        if f["type"] == "DiskFull" or "[Errno 28]" in f["message"] or "No space left" in f["message"]:
            message = (
                f["message"] if f["type"] == "DiskFull" else disk_full_message(run_dir, "the run's files")
            )
            return Failure(
                cause="disk_full", rank=f["rank"], pid=f.get("pid"), type=f["type"], message=message
            )
        return Failure(
            cause="exception", rank=f["rank"], pid=f.get("pid"), type=f["type"], message=f["message"]
        )

    own = [f for f in fails.values() if not _collateral(f)]
    if own:
        return raised(min(own, key=lambda x: x["time"]))
    vanished = [r for r in ranks.values() if r["rank"] not in fails]
    if vanished:
        if first_dead is not None and first_dead["rank"] not in fails:
            r = first_dead
        else:
            r = min(vanished, key=lambda x: x["rank"])
        return Failure(cause="vanished", rank=r["rank"], pid=r["pid"], exit_code=exit_code, signal=sig)
    if fails:
        return raised(min(fails.values(), key=lambda x: x["time"]))
    return Failure(cause="launcher", exit_code=rc, signal=sig)


class StopLadder:
    """The one stop ladder, for every backend: once a stop is requested (or a hang declared),
    SIGINT when the grace period is over (the ranks had that long to checkpoint and exit on
    their own), SIGTERM SIGINT_WAIT_S later, SIGKILL SIGTERM_WAIT_S after that; each once."""

    def __init__(self, grace_s: float):
        self.steps = (("SIGINT", grace_s), ("SIGTERM", grace_s + SIGINT_WAIT_S),
                      ("SIGKILL", grace_s + SIGINT_WAIT_S + SIGTERM_WAIT_S))  # fmt: skip
        self.sent: set[str] = set()

    def due(self, requested_at: float | None) -> list[tuple[str, float]]:
        """The signals due now and not sent yet, each with the seconds since the request."""
        if requested_at is None:
            return []
        waited = time.monotonic() - requested_at
        out = [
            (name, round(waited, 1))
            for name, after in self.steps
            if waited >= after and name not in self.sent
        ]
        self.sent.update(name for name, _ in out)
        return out


def rank_records(run_dir: Path, attempt: int) -> dict[int, dict[str, Any]]:
    """The ranks' own records of this attempt (ranks/rank*.json, on this machine), by rank."""
    out = {}
    for f in (run_dir / "ranks").glob("rank*.json"):
        info = read_json(f)
        if info and info.get("attempt") == attempt:
            out[info["rank"]] = info
    return out


def first_dead_rank(
    run_dir: Path, attempt: int, records: dict[int, dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The first rank of this attempt (on this machine) whose process is gone, if any, other
    than ranks that finished; `records`: rank_records() when the caller has read them."""
    for _, info in sorted((rank_records(run_dir, attempt) if records is None else records).items()):
        if not info.get("done") and not process_alive(info["pid"], info.get("create_time")):
            return {**info, "seen_at": time.time()}
    return None


def ranks_done(records: dict[int, dict[str, Any]], ranks: int) -> bool:
    """Every rank 0..ranks-1 recorded that it finished, and its process is gone."""
    return all(
        r in records
        and records[r].get("done")
        and not process_alive(records[r]["pid"], records[r].get("create_time"))
        for r in range(ranks)
    )


def _collateral(failure: dict[str, Any]) -> bool:
    """A rank's failure that is a consequence of another rank's: lost peer, or terminated."""
    if failure["type"] in ("Terminated", "KeyboardInterrupt", "DistBackendError"):
        return True
    msg = failure["message"].lower()
    return any(k in msg for k in ("connection reset", "connection closed", "gloo", "nccl", "broken pipe"))


def reap_orphans(run_id: str) -> list[int]:
    """Kill processes of earlier attempts of this run, found by the job tag in their
    environment (set by local.job_env), never by name pattern; returns their pids."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid"]):
        try:
            tag = p.environ().get("JUPYTER_LLM_JOB", "")
        except (psutil.Error, OSError):
            continue
        if tag.startswith(f"{run_id}:") and p.pid != os.getpid():
            mine.append(p)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine, timeout=10)
    return [p.pid for p in mine]
