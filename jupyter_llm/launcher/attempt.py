"""One attempt of a run: a launch, a resume, or an automatic restart.

The attempt is the one owner of what happens to a run while its job runs: every status
transition and event, the stop (the request the ranks look for, then the stop ladder), the
hang check, and the final-state decision. A runner (`launcher.runners`, one per backend)
starts the backend's job and asks the attempt; the supervisor makes attempts one after
another and decides nothing about them itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import has_room
from ..files import now_iso, write_json_atomic
from ..folder import (
    CONTROL_DIR,
    EVENTS_FILE,
    FINAL_DIR,
    LOGS_DIR,
    METRICS_FILE,
    PARENT_ENV,
    Event,
    RunFolder,
    State,
    record_event,
    write_status,
)
from .local import kill_group, parent_tag, signal_group
from .system import Sampler, rank_pids
from .watch import SIGINT_WAIT_S, StopLadder, first_dead_rank, rank_records, ranks_done, retryable

POLL_S = 0.25
STOP_FILE = "stop"  # control/stop: the stop request the ranks look for at each log step
STOP = "STOP"  # what polls() sends when it made the stop request (ssh agents forward it)


@dataclass
class StopFlag:
    """The stop signal the supervisor received (SIGTERM, SIGINT, SIGHUP), shared by its attempts;
    the signal handler only notes it, the attempt's watch loop acts on it."""

    signum: int | None = None


class Attempt:
    """Attempt `number` of the run in `run_dir`. `restarts_left`: how many automatic restarts
    the run may still make (train.max_restarts, less those made by this supervisor)."""

    def __init__(
        self, run: RunFolder, number: int, *, resume: bool, stop: StopFlag, restarts_left: int = 0,
        restarts_done: int = 0, budget: int = 0,
    ):  # fmt: skip
        self.run, self.dir, self.number, self.resume, self.stop = run, run.path, number, resume, stop
        self.restarts_left, self.restarts_done, self.budget = restarts_left, restarts_done, budget
        self.prepare_only = run.status().get("job") == "prepare"
        self.restart: dict[str, Any] | None = None  # set when this attempt ends in a restart
        self.stop_requested_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.first_dead: dict[str, Any] | None = None
        self.hung: str | None = None
        self.launched_at = time.time()

    @property
    def stop_signal(self) -> int | None:
        return self.stop.signum

    # -- status and events ------------------------------------------------------------------

    def set_status(self, state: State, **fields: Any) -> None:
        write_status(self.dir, state, **fields)

    def event(self, name: Event, **fields: Any) -> None:
        record_event(self.dir, name, **fields)

    def log(self, text: str) -> None:
        with open(self.dir / LOGS_DIR / "supervisor.log", "a") as f:
            f.write(f"{now_iso()} {text}\n")

    # -- the job ------------------------------------------------------------------------------

    def spawn(self, argv: list[str], env: dict[str, str]) -> int:
        """Start the job in its own process group (we signal exactly this job), its output
        appended to logs/launcher.log; returns the group id."""
        env = {**env, PARENT_ENV: parent_tag()}
        with open(self.dir / LOGS_DIR / "launcher.log", "ab") as log:
            log.write(f"\n== attempt {self.number} at {now_iso()}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.launched_at = time.time()
        return self.proc.pid

    def watch(self, ranks: int | None = None) -> int:
        """The job's exit code, once it exits, or 0 as soon as all `ranks` ranks (this machine's
        job) are done and gone: DeepSpeed's launcher notices within a second and then tears
        down its own interpreter (measured: 2-3 s more), with nothing left to do."""
        assert self.proc is not None
        system = Sampler(self.dir)
        for _ in self.polls(self._signal):
            if (rc := self.proc.poll()) is not None:
                return rc
            records = rank_records(self.dir, self.number)
            if not self.prepare_only:
                system.sample(functools.partial(rank_pids, records))
            if ranks and ranks_done(records, ranks):
                return 0
            if self.first_dead is None:  # the first rank whose process vanished failed first
                self.first_dead = first_dead_rank(self.dir, self.number, records)
        raise AssertionError("unreachable")

    def _signal(self, name: str) -> str | None:
        if name == STOP or self.proc is None:  # this machine's ranks read control/stop themselves
            return None
        signal_group(self.proc.pid, signal.Signals[name])
        return name

    def polls(self, send: Callable[[str], str | None], every_s: float = POLL_S) -> Iterator[None]:
        """The one watch loop's clock, for every backend: each `every_s`, turn a stop signal into
        the ranks' stop request (and `send(STOP)`), check for a hang, and `send` the stop
        ladder's signals that are due ("SIGINT", "SIGTERM", "SIGKILL") to the job, recording
        what `send` says it sent; then yield to the runner's own checks."""
        ladder = StopLadder(self.grace_s)
        while True:
            time.sleep(every_s)
            if self.handle_stop():
                send(STOP)
            self.check_hang()
            for name, waited in ladder.due(self.stop_requested_at):
                if (sent := send(name)) is not None:
                    self.event(Event.SIGNAL, signal=sent, after_s=waited)
            yield

    def kill_group(self, wait_s: float = 10.0) -> None:
        """SIGKILL the job's process group and wait until it is gone (reaped)."""
        if self.proc is not None:
            kill_group(self.proc.pid, wait_s)
            self.proc.poll()  # reap the launcher

    # -- stop and hang ------------------------------------------------------------------------

    @property
    def grace_s(self) -> float:
        """How long a stop waits for the ranks' own checkpoint-then-exit (train.stop_grace_s)."""
        return 0.0 if self.prepare_only else self.run.spec.train.stop_grace_s

    def handle_stop(self) -> bool:
        """Turn a received stop signal into the stop request the ranks look for; True
        when it did so now."""
        if self.stop_signal is None or self.stop_requested_at is not None:
            return False
        self.stop_requested_at = time.monotonic()
        # the ranks look for this file at their next log step, save a checkpoint and exit
        write_json_atomic(
            self.dir / CONTROL_DIR / STOP_FILE, {"requested_at": now_iso(), "signal": self.stop_signal}
        )
        self.event(Event.STOP_REQUESTED, signal=signal.Signals(self.stop_signal).name)
        self.set_status(State.STOPPING)
        return True

    def check_hang(self) -> bool:
        """The one hang check: no write by the job (metrics, events, rank logs) for
        train.hang_timeout_s, counted from its first metrics line. A hung job is stopped at
        once from SIGINT and SIGTERM on (StopLadder); True when it was declared hung now."""
        hang_s = self.run.spec.train.hang_timeout_s
        if not hang_s or self.hung is not None or not self.stalled(hang_s):
            return False
        self.hung = f"hung: no progress for {hang_s:g} s (train.hang_timeout_s); stopped"
        self.event(Event.HUNG, timeout_s=hang_s)
        self.stop_requested_at = self.stop_requested_at or time.monotonic() - self.grace_s - SIGINT_WAIT_S
        return True

    def stalled(self, timeout_s: float) -> bool:
        """No write by the job (metrics, events, rank logs) for `timeout_s`, counted from its
        first metrics line of this attempt: start-up (op builds, data, downloads) may be long."""
        try:
            if (self.dir / METRICS_FILE).stat().st_mtime < self.launched_at:
                return False
        except OSError:
            return False
        newest = self.launched_at
        for p in [self.dir / METRICS_FILE, self.dir / EVENTS_FILE, *(self.dir / LOGS_DIR).glob("rank*.log")]:
            with contextlib.suppress(OSError):
                newest = max(newest, p.stat().st_mtime)
        return time.time() - newest > timeout_s

    def stopped_cleanly(self) -> bool:
        return any(e.get("event") == Event.STOPPED_AT for e in self.run.events()[-20:])

    # -- the end ------------------------------------------------------------------------------

    def conclude(self, rc: int, why: Callable[[], tuple[str, dict[str, Any] | None]]) -> int:
        """The one final-state decision of an attempt, for every backend: completed (exit 0 and
        a final model; the spec's eval: starts), failed as hung, stopped (cleanly, or without
        its final checkpoint), failed without a final model, or failed for `why()` (the
        backend's diagnosis: the sentence and the fields)."""
        if rc == 0 and (self.dir / FINAL_DIR / "config.json").is_file():
            self.write_card()  # before the final state: the report's follower logs final/ with it
            code = self.finish(State.COMPLETED, rc, None)
            self.auto_eval()
            return code
        if self.hung:
            return self.fail_or_restart(self.hung, rc, None, hung=True)
        if self.stop_signal is not None:
            if self.stopped_cleanly():
                return self.finish(State.STOPPED, rc, None)
            return self.finish(State.STOPPED, rc, "stopped without a final checkpoint (grace period ran out)")
        if rc == 0:
            return self.fail("the job exited 0 but no final model is in the run folder; see logs/", rc)
        reason, failure = why()
        return self.fail_or_restart(reason, rc, failure)

    def fail_or_restart(
        self, reason: str, rc: int | None, failure: dict[str, Any] | None, hung: bool = False
    ) -> int:
        """The attempt failed: restart it (the supervisor does, after the backoff) when the cause
        is the infrastructure's and restarts are left; else end failed, saying why not."""
        retry, kind = retryable(failure, hung)
        if retry and (failure or {}).get("cause") == "disk_full":
            retry = has_room(self.dir, self.run.checkpoint_mb())  # only once the next checkpoint fits
        if retry and self.stop_signal is None and self.restarts_left > 0 and not self.prepare_only:
            self.restart = {"reason": reason, "class": kind, "failure": failure, "exit_code": rc}
            return 1
        if self.budget and retry:
            reason += (
                f" (after {self.restarts_done} automatic restart(s): train.max_restarts is {self.budget})"
            )
        elif self.budget and self.restarts_done == 0:
            self.event(Event.NOT_RESTARTED, reason=reason, **{"class": kind})
        return self.fail(reason, rc, failure)

    def fail(self, reason: str, rc: int | None = None, failure: dict[str, Any] | None = None) -> int:
        """End failed: `reason` is the sentence for people, `failure` the same as fields."""
        return self.finish(State.FAILED, rc, reason, failure)

    def finish(
        self, state: State, rc: int | None, error: str | None, failure: dict[str, Any] | None = None
    ) -> int:
        self._remove_swap()
        self.set_status(state, ended_at=now_iso(), exit_code=rc, error=error, failure=failure)
        self.event(Event(state.value), **({"reason": error} if error else {}))
        return 0 if state != State.FAILED else 1

    def _remove_swap(self) -> None:
        """offload: nvme: the run's swap files are scratch (checkpoints hold the state)."""
        from ..spec import swap_dir

        swap = swap_dir(self.run.spec, self.run.id)
        if swap and os.path.isdir(swap):
            shutil.rmtree(swap, ignore_errors=True)
            self.event(Event.SWAP_REMOVED, path=swap)

    def write_card(self) -> None:
        from ..card import write

        try:
            write(self.run)
        except Exception as e:  # the model is there; only its card is missing
            self.event(Event.CARD_ERROR, error=f"{type(e).__name__}: {e}")

    def auto_eval(self) -> None:
        """The spec's `eval:` section: evaluate the final model as its own detached job."""
        request = self.run.spec.eval
        if request is None:
            return
        from ..evaluation import evaluate

        try:
            ev = evaluate(self.run, request)
        except Exception as e:  # the run stays completed; the event says why nothing was evaluated
            self.event(Event.EVAL_NOT_STARTED, error=f"{type(e).__name__}: {e}")
            return
        self.event(Event.EVAL_STARTED, eval_id=ev.id)


def stop_file(run_dir: Path) -> Path:
    return run_dir / CONTROL_DIR / STOP_FILE
