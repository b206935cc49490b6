"""The detached supervisor: `python -m jupyter_llm.launcher.supervisor RUN_DIR [--resume]`.

One per attempt of a run. It owns every `status.json` transition, starts DeepSpeed's
launcher in a process group of its own, watches the ranks, turns a stop request into a
checkpoint-then-exit (escalating SIGINT → SIGTERM → SIGKILL on that group only), and
records why a job failed and which rank it was.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import gpu_count
from ..errors import disk_full_message, has_room
from ..files import append_jsonl, now_iso, read_json, write_json_atomic
from ..folder import (
    EVENTS_FILE,
    FINAL_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    PARENT_ENV,
    STATUS_FILE,
    RunFolder,
    State,
    write_status,
)
from ..hashing import content_sha256
from ..provenance import git_sha, versions
from .local import free_port, job_env, kill_group, parent_tag, port_free, signal_group
from .system import Sampler, rank_pids
from .watch import (
    SIGINT_WAIT_S,
    StopLadder,
    diagnose,
    first_dead_rank,
    rank_records,
    ranks_done,
    reap_orphans,
    retryable,
)

POLL_S = 0.25
RESERVE_FILE = ".reserve"  # held while the supervisor runs; freed to write the end of a full disk
RESERVE_BYTES = 1 << 20
SPAWN_TIMEOUT_S = 60.0  # start(): the detaching supervisor's first process exits within a second


class Supervisor:
    def __init__(self, run_dir: Path, resume: bool):
        self.run = RunFolder(run_dir)
        self.dir = run_dir
        self.resume = resume
        self.stop_signal: int | None = None
        self._reset_attempt()
        self.prepare_only = (read_json(run_dir / STATUS_FILE) or {}).get("job") == "prepare"
        self.restart: dict[str, Any] | None = None  # the failure an automatic restart follows
        self.restarts_here = 0  # by this supervisor (each launch or resume has the budget anew)

    def _reset_attempt(self) -> None:
        """What one attempt knows of its job; a new attempt (an automatic restart) starts bare."""
        self.stop_requested_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.first_dead: dict[str, Any] | None = None
        self.hung: str | None = None
        self.launched_at = time.time()

    # -- status -------------------------------------------------------------------------

    def set_status(self, state: State, **fields: Any) -> None:
        write_status(self.dir, state, **fields)

    def event(self, name: str, **fields: Any) -> None:
        append_jsonl(self.dir / EVENTS_FILE, {"time": now_iso(), "event": name, **fields})

    # -- main ---------------------------------------------------------------------------

    def announce(self, pid: int) -> None:
        """Enter starting/resuming for supervisor `pid`: the first transition of an attempt."""
        import psutil

        prev = read_json(self.dir / STATUS_FILE) or {}
        self.set_status(
            State.RESUMING if self.resume else State.STARTING,
            pid=pid, pid_create_time=psutil.Process(pid).create_time(),
            attempt=int(prev.get("attempt") or 0) + 1, started_at=prev.get("started_at") or now_iso(),
            ended_at=None, exit_code=None, error=None, failure=None, lost=None, job_pgid=None,
        )  # fmt: skip

    def main(self) -> int:
        self.attempt = int((read_json(self.dir / STATUS_FILE) or {})["attempt"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        (self.dir / "control").mkdir(exist_ok=True)
        (self.dir / "control" / "stop").unlink(missing_ok=True)
        reserve = self.dir / RESERVE_FILE
        # room for the final state when the disk fills up
        with contextlib.suppress(OSError), open(reserve, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
        self.start_report()
        try:
            while True:
                rc = self._supervise(self.attempt)
                if self.restart is None:
                    return rc
                if not self._restart():  # a stop came during the backoff
                    return self.finish(State.STOPPED, None, None)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                self._crashed(e)
                raise
            self.kill_group()
            reserve.unlink(missing_ok=True)
            why = disk_full_message(self.dir, "the run's files")
            self.finish(State.FAILED, None, why, {"cause": "disk_full", "message": why})
            return 1
        except Exception as e:  # the supervisor itself must always leave a final state
            self._crashed(e)
            raise
        finally:
            reserve.unlink(missing_ok=True)

    def _crashed(self, e: Exception) -> None:
        self.kill_group()
        self.set_status(State.FAILED, ended_at=now_iso(), error=f"supervisor error: {e}")
        self.event("failed", reason=f"supervisor error: {e}")

    def _supervise(self, attempt: int) -> int:
        spec = self.run.spec
        reaped = reap_orphans(self.run.id)
        if reaped:  # an earlier attempt's job outlived its supervisor (SIGKILL, say)
            self.event("reaped_orphans", pids=reaped)
        if self.run.status().get("master_port"):  # and maybe left its shm buffers behind
            _unlink_shm(self.run.status()["master_port"])
        if self.prepare_only:
            return self._supervise_prepare(attempt)
        from ..cluster import run_cluster
        from .multinode import MultiNode

        if (cluster := run_cluster(self.dir)) is not None:  # remote node(s), multi-node, Slurm
            return MultiNode(self, cluster, attempt).supervise()
        cuda, ngpu = _gpus()
        pp = spec.distributed.procs_per_node
        nprocs = pp if isinstance(pp, int) else (ngpu or 1)
        if cuda and nprocs > ngpu:
            return self.fail(f"distributed.procs_per_node={nprocs} but this machine has {ngpu} GPU(s)")
        want = spec.distributed.master_port
        if want is not None and not port_free(want):
            return self.fail(f"distributed.master_port {want} is in use; remove it to pick a free port")
        port = free_port(want)  # picked just before launch: the window for a clash is short
        from .backends import commands, local_node

        cmd = commands(
            spec, None, self.dir, port, [local_node(self.dir, nprocs)], attempt=attempt, cpu=not cuda
        )[0]
        argv, env = cmd.argv, cmd.env
        self._write_manifest(argv, nprocs, port, attempt)
        if self.stop_signal is not None:  # stopped before the job started
            return self.finish(State.STOPPED, 0, None)
        pgid = self.spawn(argv, env, attempt)
        self.event("launched", attempt=attempt, ranks=nprocs, master_port=port, command=argv, job_pgid=pgid)
        self.set_status(State.RUNNING, job_pgid=pgid, world_size=nprocs, master_port=port)
        rc = self.watch(ranks=nprocs)
        self.kill_group()  # nothing of this job outlives it
        _unlink_shm(port)

        def why() -> tuple[str, dict[str, Any] | None]:
            failure = diagnose(self.dir, self.attempt, rc, self.first_dead, self.run.log_tail(200))
            return failure.sentence(), failure.model_dump()

        return self.conclude(rc, why)

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

    def max_restarts(self) -> int:
        """train.max_restarts; None: 2 on a cluster (nodes or Slurm), 0 on this machine."""
        from ..cluster import run_cluster

        n = self.run.spec.train.max_restarts
        return n if n is not None else (2 if run_cluster(self.dir) is not None else 0)

    def fail_or_restart(
        self, reason: str, rc: int | None, failure: dict[str, Any] | None, hung: bool = False
    ) -> int:
        """An attempt failed: restart it (the main loop does, after the backoff) when the cause
        is the infrastructure's and restarts are left; else end failed, saying why not."""
        retry, kind = retryable(failure, hung)
        budget = self.max_restarts()
        if retry and (failure or {}).get("cause") == "disk_full":
            retry = has_room(self.dir, self.run.checkpoint_mb())  # only once the next checkpoint fits
        if retry and self.stop_signal is None and self.restarts_here < budget and not self.prepare_only:
            self.restart = {"reason": reason, "class": kind, "failure": failure, "exit_code": rc}
            return 1
        if budget and retry:
            reason += f" (after {self.restarts_here} automatic restart(s): train.max_restarts is {budget})"
        elif budget and self.restarts_here == 0:
            self.event("not_restarted", reason=reason, **{"class": kind})
        return self.fail(reason, rc, failure)

    def _restart(self) -> bool:
        """Wait the backoff (train.restart_backoff_s, doubling with each restart), then make
        the next attempt: status `resuming`, attempt + 1, restarts + 1. False when a stop
        request arrived meanwhile (nothing is running; the run ends stopped)."""
        assert self.restart is not None
        delay = min(self.run.spec.train.restart_backoff_s * 2**self.restarts_here, 600.0)
        total = int(self.run.status().get("restarts") or 0) + 1
        self.event("restarting", restart=total, next_attempt=self.attempt + 1, after_s=delay, **self.restart)
        self.set_status(State.RESUMING, restarts=total, error=None, failure=None, exit_code=None, job_pgid=None,
                        last_restart={"time": now_iso(), "reason": self.restart["reason"],
                                      "class": self.restart["class"]})  # fmt: skip
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.stop_signal is not None:
                self.restart = None
                return False
            time.sleep(POLL_S)
        self.restart, self.restarts_here = None, self.restarts_here + 1
        self.attempt += 1
        self.resume = True
        self._reset_attempt()
        (self.dir / "control" / "stop").unlink(missing_ok=True)
        self.set_status(State.RESUMING, attempt=self.attempt)
        return True

    def start_report(self) -> None:
        """report_to: the follower that sends the run's folder to its targets (its own process)."""
        targets = [] if self.prepare_only else self.run.spec.report_to
        if not targets:
            return
        from ..report import start_follower

        try:
            self.event("report_started", to=targets, pid=start_follower(self.dir))
        except Exception as e:  # reporting never stops a run
            self.event("report_error", target="all", error=f"{type(e).__name__}: {e}")

    def write_card(self) -> None:
        from ..card import write

        try:
            write(self.run)
        except Exception as e:  # the model is there; only its card is missing
            self.event("card_error", error=f"{type(e).__name__}: {e}")

    def auto_eval(self) -> None:
        """The spec's `eval:` section: evaluate the final model as its own detached job."""
        request = self.run.spec.eval
        if request is None:
            return
        from ..evaluation import evaluate

        try:
            ev = evaluate(self.run, request)
        except Exception as e:  # the run stays completed; the event says why nothing was evaluated
            self.event("eval_not_started", error=f"{type(e).__name__}: {e}")
            return
        self.event("eval_started", eval_id=ev.id)

    def _supervise_prepare(self, attempt: int) -> int:
        """A data-preparation job: one process, no ranks; stop means SIGINT at once."""
        argv = [sys.executable, "-u", "-m", "jupyter_llm.train.prepare", str(self.dir)]
        env = job_env(self.dir, attempt)
        self._write_manifest(argv, 1, 0, attempt)
        if self.stop_signal is not None:
            return self.finish(State.STOPPED, 0, None)
        pgid = self.spawn(argv, env, attempt)
        self.event("launched", attempt=attempt, job="prepare", command=argv, job_pgid=pgid)
        self.set_status(State.RUNNING, job_pgid=pgid, world_size=1)
        rc = self.watch()
        self.kill_group()
        if rc == 0 and (self.dir / "data.json").is_file():
            return self.finish(State.COMPLETED, rc, None)
        if self.stop_signal is not None:
            return self.finish(State.STOPPED, rc, None)  # nothing half-written looks valid
        failure = read_json(self.dir / "failures" / "rank0.json")
        if failure and failure.get("attempt") == attempt:
            return self.fail(f"preparation failed: {failure['type']}: {failure['message']}".strip(), rc)
        return self.fail(f"preparation exited with code {rc}; see logs/prepare.log", rc)

    def spawn(self, argv: list[str], env: dict[str, str], attempt: int) -> int:
        """Start the job in its own process group (we signal exactly this job), its output
        appended to logs/launcher.log; returns the group id."""
        env = {**env, PARENT_ENV: parent_tag()}
        with open(self.dir / "logs" / "launcher.log", "ab") as log:
            log.write(f"\n== attempt {attempt} at {now_iso()}: {' '.join(argv)}\n".encode())
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
        ladder = StopLadder(self.grace_s)
        system = Sampler(self.dir)
        while (rc := self.proc.poll()) is None:
            time.sleep(POLL_S)
            records = rank_records(self.dir, self.attempt)
            if not self.prepare_only:
                system.sample(functools.partial(rank_pids, records))
            if ranks and ranks_done(records, ranks):
                return 0
            self._track_ranks(records)
            self.handle_stop()
            self.check_hang()
            for name, waited in ladder.due(self.stop_requested_at):
                self.event("signal", signal=name, after_s=waited)
                self._signal_group(signal.Signals[name])
        return rc

    @property
    def grace_s(self) -> float:
        """How long a stop waits for the ranks' own checkpoint-then-exit (train.stop_grace_s)."""
        return 0.0 if self.prepare_only else self.run.spec.train.stop_grace_s

    def check_hang(self) -> bool:
        """The one hang check: no write by the job (metrics, events, rank logs) for
        train.hang_timeout_s, counted from its first metrics line. A hung job is stopped at
        once from SIGINT and SIGTERM on (StopLadder); True when it was declared hung now."""
        hang_s = self.run.spec.train.hang_timeout_s
        if not hang_s or self.hung is not None or not self.stalled(hang_s):
            return False
        self.hung = f"hung: no progress for {hang_s:g} s (train.hang_timeout_s); stopped"
        self.event("hung", timeout_s=hang_s)
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
        for p in [
            self.dir / METRICS_FILE,
            self.dir / EVENTS_FILE,
            *(self.dir / "logs").glob("rank*.log"),
        ]:
            with contextlib.suppress(OSError):
                newest = max(newest, p.stat().st_mtime)
        return time.time() - newest > timeout_s

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        # only note it: the watch loop acts on it, so no file is written from a signal handler
        self.stop_signal = self.stop_signal or signum

    def handle_stop(self) -> bool:
        """Turn a received stop signal into the stop request the ranks look for; True
        when it did so now."""
        if self.stop_signal is None or self.stop_requested_at is not None:
            return False
        self.stop_requested_at = time.monotonic()
        # the ranks look for this file at their next log step, save a checkpoint and exit
        write_json_atomic(
            self.dir / "control" / "stop", {"requested_at": now_iso(), "signal": self.stop_signal}
        )
        self.event("stop_requested", signal=signal.Signals(self.stop_signal).name)
        self.set_status(State.STOPPING)
        return True

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            signal_group(self.proc.pid, sig)

    def kill_group(self, wait_s: float = 10.0) -> None:
        """SIGKILL the job's process group and wait until it is gone (reaped)."""
        if self.proc is not None:
            kill_group(self.proc.pid, wait_s)
            self.proc.poll()  # reap the launcher

    def _track_ranks(self, records: dict[int, dict[str, Any]] | None = None) -> None:
        """Remember the first rank whose process vanished: that one failed first."""
        if self.first_dead is None:
            self.first_dead = first_dead_rank(self.dir, self.attempt, records)

    def stopped_cleanly(self) -> bool:
        return any(e.get("event") == "stopped_at" for e in self.run.events()[-20:])

    def fail(self, reason: str, rc: int | None = None, failure: dict[str, Any] | None = None) -> int:
        """End failed: `reason` is the sentence for people, `failure` the same as fields."""
        return self.finish(State.FAILED, rc, reason, failure)

    def finish(
        self, state: State, rc: int | None, error: str | None, failure: dict[str, Any] | None = None
    ) -> int:
        self._remove_swap()
        self.set_status(state, ended_at=now_iso(), exit_code=rc, error=error, failure=failure)
        self.event(state.value, **({"reason": error} if error else {}))
        return 0 if state != State.FAILED else 1

    def _remove_swap(self) -> None:
        """offload: nvme: the run's swap files are scratch (checkpoints hold the state)."""
        from ..spec import swap_dir

        swap = swap_dir(self.run.spec, self.run.id)
        if swap and os.path.isdir(swap):
            shutil.rmtree(swap, ignore_errors=True)
            self.event("swap_removed", path=swap)

    # -- manifest -----------------------------------------------------------------------

    def _write_manifest(self, argv: list[str], nprocs: int, port: int, attempt: int) -> None:
        spec = self.run.spec
        files = list(spec.data.train) + list(spec.data.validation or [])
        prev = read_json(self.dir / MANIFEST_FILE) or {}
        manifest = {
            "run_id": self.run.id,
            "spec": spec.to_dict(),
            "ds_config": self.run.ds_config,
            "seed": spec.seed,
            "versions": versions(),
            "git_sha": git_sha(os.environ.get("JUPYTER_LLM_CALLER_CWD")),
            "host": platform.node(),
            "data_files": {f: _sha256(f) for f in files} if not prev else prev.get("data_files"),
            "transform_sha256": _sha256(str(self.dir / "transform.pkl")),  # a notebook data transform
            "attempts": [*prev.get("attempts", []),
                         {"attempt": attempt, "time": now_iso(), "command": argv, "ranks": nprocs, "master_port": port}],
        }  # fmt: skip
        write_json_atomic(self.dir / MANIFEST_FILE, manifest)


def _unlink_shm(port: int, addr: str = "127.0.0.1") -> list[str]:
    """Remove the /dev/shm all-reduce buffers of DeepSpeed's CPU shm backend for this job.

    DeepSpeed creates one ~70 MB segment per rank, named after uid, master address and port,
    and never unlinks them: left alone, every CPU run leaks RAM until the machine swaps.
    """
    shm = Path("/dev/shm")
    gone = []
    for f in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        with contextlib.suppress(OSError):
            f.unlink()
            gone.append(f.name)
    return gone


def _gpus() -> tuple[bool, int]:
    """(any GPU, GPU count), from nvidia-smi: no torch import, no CUDA context here."""
    n = gpu_count()
    return n > 0, n


def _sha256(path: str) -> str | None:
    try:
        return content_sha256(path)
    except OSError:
        return None


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
