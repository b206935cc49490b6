"""The detached supervisor: `python -m jupyter_llm.launcher.supervisor RUN_DIR [--resume]`.

One per launch or resume of a run, detached from whoever started it. It makes the run's
attempts (`attempt.Attempt`: status transitions, events, the stop ladder, the hang check, the
final state), each through its backend's runner (`runners.RUNNERS`: this machine, ssh nodes,
pdsh, Slurm), and an automatic restart after an attempt that asks for one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import disk_full_message
from ..files import now_iso, read_json
from ..folder import CONTROL_DIR, STATUS_FILE, Event, RunFolder, State, record_event, write_status
from .attempt import POLL_S, Attempt, StopFlag, stop_file
from .runners import runner_for, unlink_shm
from .watch import reap_orphans

RESERVE_FILE = ".reserve"  # held while the supervisor runs; freed to write the end of a full disk
RESERVE_BYTES = 1 << 20
SPAWN_TIMEOUT_S = 60.0  # start(): the detaching supervisor's first process exits within a second


class Supervisor:
    """Makes the run's attempts one after another: the first (a launch or a resume), then an
    automatic restart after each attempt that ends in one, until one ends for good. What
    happens inside an attempt is the attempt's (`attempt.Attempt`) and its runner's."""

    def __init__(self, run_dir: Path, resume: bool):
        self.run = RunFolder(run_dir)
        self.dir = run_dir
        self.resume = resume
        self.stop = StopFlag()
        self.current: Attempt | None = None
        self.restarts_here = 0  # by this supervisor (each launch or resume has the budget anew)

    def event(self, name: Event, **fields: Any) -> None:
        record_event(self.dir, name, **fields)

    def announce(self, pid: int) -> None:
        """Enter starting/resuming for supervisor `pid`: the first transition of an attempt."""
        import psutil

        prev = read_json(self.dir / STATUS_FILE) or {}
        write_status(
            self.dir, State.RESUMING if self.resume else State.STARTING,
            pid=pid, pid_create_time=psutil.Process(pid).create_time(),
            attempt=int(prev.get("attempt") or 0) + 1, started_at=prev.get("started_at") or now_iso(),
            ended_at=None, exit_code=None, error=None, failure=None, lost=None, job_pgid=None,
        )  # fmt: skip

    def main(self) -> int:
        number = int((read_json(self.dir / STATUS_FILE) or {})["attempt"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        (self.dir / CONTROL_DIR).mkdir(exist_ok=True)
        stop_file(self.dir).unlink(missing_ok=True)
        reserve = self.dir / RESERVE_FILE
        # room for the final state when the disk fills up
        with contextlib.suppress(OSError), open(reserve, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
        self.start_report()
        try:
            while True:
                att = self.current = self._attempt(number)
                rc = self._supervise(att)
                if att.restart is None:
                    return rc
                if not self._backoff(att):  # a stop came during the backoff
                    return att.finish(State.STOPPED, None, None)
                number, self.resume = att.number + 1, True
                stop_file(self.dir).unlink(missing_ok=True)
                write_status(self.dir, State.RESUMING, attempt=number)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                self._crashed(e)
                raise
            att = self.current or self._attempt(number)
            att.kill_group()
            reserve.unlink(missing_ok=True)
            why = disk_full_message(self.dir, "the run's files")
            att.finish(State.FAILED, None, why, {"cause": "disk_full", "message": why})
            return 1
        except Exception as e:  # the supervisor itself must always leave a final state
            self._crashed(e)
            raise
        finally:
            reserve.unlink(missing_ok=True)

    def _attempt(self, number: int) -> Attempt:
        budget = self.max_restarts()
        return Attempt(self.run, number, resume=self.resume, stop=self.stop, budget=budget,
                       restarts_left=budget - self.restarts_here, restarts_done=self.restarts_here)  # fmt: skip

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        # only note it: the attempt's watch loop acts on it, so no file is written from a signal handler
        self.stop.signum = self.stop.signum or signum

    def _crashed(self, e: Exception) -> None:
        if self.current is not None:
            self.current.kill_group()
        write_status(self.dir, State.FAILED, ended_at=now_iso(), error=f"supervisor error: {e}")
        self.event(Event.FAILED, reason=f"supervisor error: {e}")

    def _supervise(self, att: Attempt) -> int:
        reaped = reap_orphans(self.run.id)
        if reaped:  # an earlier attempt's job outlived its supervisor (SIGKILL, say)
            att.event(Event.REAPED_ORPHANS, pids=reaped)
        if port := self.run.status().get("master_port"):  # and maybe left its shm buffers behind
            unlink_shm(port)
        from ..cluster import run_cluster

        return runner_for(att, run_cluster(self.dir)).run()

    def max_restarts(self) -> int:
        """train.max_restarts; None: 2 on a cluster (nodes or Slurm), 0 on this machine."""
        from ..cluster import run_cluster

        n = self.run.spec.train.max_restarts
        return n if n is not None else (2 if run_cluster(self.dir) is not None else 0)

    def _backoff(self, att: Attempt) -> bool:
        """Wait the backoff (train.restart_backoff_s, doubling with each restart) before the
        next attempt: status `resuming`, restarts + 1. False when a stop request arrived
        meanwhile (nothing is running; the run ends stopped)."""
        assert att.restart is not None
        delay = min(self.run.spec.train.restart_backoff_s * 2**self.restarts_here, 600.0)
        total = int(self.run.status().get("restarts") or 0) + 1
        att.event(Event.RESTARTING, restart=total, next_attempt=att.number + 1, after_s=delay, **att.restart)
        att.set_status(State.RESUMING, restarts=total, error=None, failure=None, exit_code=None, job_pgid=None,
                       last_restart={"time": now_iso(), "reason": att.restart["reason"],
                                     "class": att.restart["class"]})  # fmt: skip
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.stop.signum is not None:
                return False
            time.sleep(POLL_S)
        self.restarts_here += 1
        return True

    def start_report(self) -> None:
        """report_to: the follower that sends the run's folder to its targets (its own process)."""
        targets = [] if self.run.status().get("job") == "prepare" else self.run.spec.report_to
        if not targets:
            return
        from ..report import start_follower

        try:
            self.event(Event.REPORT_STARTED, to=targets, pid=start_follower(self.dir))
        except Exception as e:  # reporting never stops a run
            self.event(Event.REPORT_ERROR, target="all", error=f"{type(e).__name__}: {e}")


def start(run_dir: Path, resume: bool = False) -> None:
    """Start the run's supervisor, detached: own session, no pipes, survives the caller.

    The supervisor forks once and the first process exits at once, so the caller has no
    child to reap and the job is reparented away from the kernel.
    """
    argv = [sys.executable, "-m", "jupyter_llm.launcher.supervisor", str(run_dir), "--detach"]
    if resume:
        argv.append("--resume")
    env = dict(os.environ, JUPYTER_LLM_CALLER_CWD=os.getcwd())
    with open(run_dir / "logs" / "supervisor.log", "ab") as log:
        try:
            subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=run_dir, env=env, check=True, timeout=SPAWN_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the supervisor of {run_dir.name} did not detach within {SPAWN_TIMEOUT_S:g} s "
                               f"(it records its state first); see {run_dir / 'logs' / 'supervisor.log'}") from None  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jupyter_llm.launcher.supervisor")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--detach", action="store_true", help="fork; the first process exits at once")
    args = ap.parse_args(argv)
    sup = Supervisor(args.run_dir.resolve(), args.resume)
    if not args.detach:
        sup.announce(os.getpid())
        return sup.main()
    # Fork so the caller's child exits at once (nothing for it to reap) while the real
    # supervisor is reparented. The parent records the new state before it exits, so the
    # caller sees `starting`/`resuming` as soon as it returns; the child waits for that.
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(r)
        try:
            sup.announce(pid)
        finally:
            os.close(w)
            os._exit(0)
    os.close(w)
    os.read(r, 1)  # EOF once the parent has announced and closed its end
    os.close(r)
    return sup.main()


if __name__ == "__main__":
    sys.exit(main())
