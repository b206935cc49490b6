"""The run-folder model: a run's states, its folder's layout and a reading handle on it.

The run folder is the only protocol between the kernel, the CLI, the supervisor and the
ranks. This layer reads folders and writes new ones; starting jobs is the launcher's
(`runs.Run` puts both behind one handle). It never imports torch.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import RunNotFound, RunStateError, disk_error
from .files import (
    Tail,
    append_jsonl,
    appended_lines,
    now_iso,
    process_alive,
    read_json,
    read_jsonl,
    tree_mb,
    write_json_atomic,
)

if TYPE_CHECKING:
    from .spec import Spec

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CKPT_MARKER = "COMPLETE"  # a checkpoint folder counts only once this file exists

# The run folder's names, in one place (every writer and reader uses these).
STATUS_FILE = "status.json"  # RunStatus; written by the supervisor alone once the run started
EVENTS_FILE = "events.jsonl"  # {"time", "event", ...}: appended by supervisor and ranks
METRICS_FILE = "metrics.jsonl"  # one line per log step (train) or evaluation (val_loss)
GRADS_FILE = "grads.jsonl"  # per-layer gradient norms (train.grad_norms_every)
SYSTEM_FILE = "system.jsonl"  # every few seconds per node: host CPU and memory, the ranks', GPUs
SAMPLES_FILE = "samples.jsonl"  # text generated during training (train.sample_every): step, prompt, output
SPEC_FILE = "spec.yaml"
DS_CONFIG_FILE = "ds_config.json"
MANIFEST_FILE = "manifest.json"  # what reproduces the run: versions, git sha, data hashes, attempts
FINAL_DIR = "final"  # the exported model (from_pretrained folder)
CARD_FILE = "README.md"  # final/README.md: the model card (Hugging Face's convention)
EVAL_FILE = "eval.json"  # the newest evaluation's result (each one also in evals/<id>/)
EVALS_DIR = "evals"
REPORTS_DIR = "reports"  # report_to: what each target has received (reports/<target>.json)
TENSORBOARD_DIR = "tensorboard"  # report_to tensorboard: the event files
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
RANKS_DIR = "ranks"  # ranks/rank{r}.json: each rank's own record of an attempt
FAILURES_DIR = "failures"  # failures/rank{r}.json: a rank's exception
CONTROL_DIR = "control"  # control/stop: the stop request the ranks look for
# "pid:create_time" of the process supervising the ranks (the supervisor, or a node's agent):
# when it is gone, the ranks ask themselves to stop (checkpoint, exit) -- no unsupervised job
PARENT_ENV = "JUPYTER_LLM_PARENT"

# status.json's format. 1: numbered ("format": 1). A folder written before the format was
# numbered reads as 0; its fields are a subset of 1's, so it reads, lists, evaluates and
# resumes as it is (the next supervisor rewrites it as 1).
STATUS_FORMAT = 1


class State(str, Enum):
    """A run's state; the terminal ones are final until a resume."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    RESUMING = "resuming"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    DAMAGED = "damaged"  # status.json is missing, cut short or invalid (read, never written)

    @property
    def terminal(self) -> bool:
        return self in (State.COMPLETED, State.FAILED, State.STOPPED, State.DAMAGED)


class Event(str, Enum):
    """The names in events.jsonl: what happened to a run, in order. Each line is
    {"time", "event", ...fields}; writers are the launch (L), the supervisor (S), the ranks (R,
    rank 0 alone), a node's agent (A) and the report follower (F). Readers keep unknown names
    (a newer writer's events survive an older reader)."""

    CREATED = "created"  # L: the folder was written
    FITTED = "fitted"  # L: procs_per_node/offload chosen to fit the nodes' memory (fit.json)
    RESUME_OVERRIDES = "resume_overrides"  # L: resume --set changed the spec (changes)
    PREFLIGHT = "preflight"  # S: the nodes' pre-flight checks (ok, checks)
    LAUNCHED = "launched"  # S: an attempt's job started (attempt, ranks, master_port, command)
    DATA_READY = "data_ready"  # R: the data is tokenized and packed (path, cached, tokens, stats)
    CHECKPOINT_CONVERTED = "checkpoint_converted"  # R: a checkpoint made universal (from, to)
    RESUMED_FROM = "resumed_from"  # R: the step the attempt continues from
    NO_CHECKPOINT = "no_checkpoint"  # R: a restart found none: starting fresh
    WARNING = "warning"  # R: something a person should know (detail)
    MODEL_READY = "model_ready"  # R: model and engine built (step, ranks, validation_first)
    CHECKPOINT = "checkpoint"  # R: a complete checkpoint (step, tag)
    STOPPED_AT = "stopped_at"  # R: stopped on request after checkpointing (step)
    EXPORTED = "exported"  # R: final/ written (path)
    ORPHANED = "orphaned"  # R: the supervising process is gone: checkpoint and exit
    STOP_REQUESTED = "stop_requested"  # S: a stop was asked for (signal)
    SIGNAL = "signal"  # S: the stop ladder escalated (signal, after_s)
    HUNG = "hung"  # S: no progress for train.hang_timeout_s
    NODE_FAILED = "node_failed"  # S: a node's job ended badly (node, exit_code)
    SWAP_REMOVED = "swap_removed"  # S/A: the NVMe swap folder was deleted (path, node)
    SLURM_UNREACHABLE = "slurm_unreachable"  # S: squeue/scontrol stopped answering
    SLURM_FINISHED = "slurm_finished"  # S: the Slurm job ended (slurm_job, state, exit_code)
    SCANCEL_FAILED = "scancel_failed"  # S: scancel did not answer (reason)
    REQUEUED = "requeued"  # S: a Slurm restart (slurm_job, restart, attempt, reason)
    REAPED_ORPHANS = "reaped_orphans"  # S: ranks of an earlier attempt killed before a restart
    RESTARTING = "restarting"  # S: an automatic restart (restart, next_attempt, after_s, cause)
    NOT_RESTARTED = "not_restarted"  # S: a failure a restart cannot fix (reason, class)
    COMPLETED = "completed"  # S: the final state (reason when there is one)
    FAILED = "failed"  # S: the final state: failed (reason)
    STOPPED = "stopped"  # S: the final state: stopped
    CARD_ERROR = "card_error"  # S: the model card could not be written (error)
    EVAL_STARTED = "eval_started"  # S: the automatic evaluation began (eval_id)
    EVAL_NOT_STARTED = "eval_not_started"  # S: it could not begin (error)
    REPORT_STARTED = "report_started"  # S: the report_to follower began (to, pid)
    REPORT_ERROR = "report_error"  # S/F: a report_to target failed (target, error)


def record_event(run_dir: Path, event: Event, **fields: Any) -> None:
    """Append one event to the run's events.jsonl (one line, appended whole)."""
    append_jsonl(run_dir / EVENTS_FILE, {"time": now_iso(), "event": event.value, **fields})


class RunStatus(BaseModel):
    """status.json: a run's state and where its processes are. Unknown keys are kept (a newer
    writer's fields survive an older reader)."""

    model_config = ConfigDict(extra="allow")

    format: int = 0
    state: State
    run_id: str | None = None
    name: str | None = None
    job: Literal["train", "prepare"] = "train"
    attempt: int = 0
    restarts: int = 0  # automatic restarts so far (train.max_restarts); the causes are events
    pid: int | None = None  # the supervisor
    pid_create_time: float | None = None
    job_pgid: int | None = None  # the launcher's process group
    world_size: int | None = None
    master_port: int | None = None
    phase: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    error: str | None = None  # why it failed, in words
    failure: dict[str, Any] | None = (
        None  # the same as fields (launcher.watch.Failure): cause, rank, node, pid, ...
    )
    lost: bool | None = None  # the supervisor is gone (read, never written)


def write_status(run_dir: Path, state: State, **fields: Any) -> RunStatus:
    """The one writer of status.json: the fields given change, the rest stay; validated and
    stamped with STATUS_FORMAT; atomic (readers see the old or the new file)."""
    path = run_dir / STATUS_FILE
    st = RunStatus.model_validate(
        {
            **(read_json(path) or {}),
            **fields,
            "state": state,
            "updated_at": now_iso(),
            "format": STATUS_FORMAT,
        }
    )
    write_json_atomic(path, st.model_dump(mode="json"))
    return st


R = TypeVar("R", bound="RunFolder")


# -- the store ----------------------------------------------------------------------------


def default_root() -> Path:
    """$JUPYTER_LLM_RUNS, else $JUPYTER_LLM_HOME/runs, else ./llm-runs."""
    if runs := os.environ.get("JUPYTER_LLM_RUNS"):
        return Path(runs).expanduser()
    home = os.environ.get("JUPYTER_LLM_HOME")
    return (Path(home).expanduser() / "runs") if home else Path.cwd() / "llm-runs"


class FolderStore(Generic[R]):
    """All runs under one root folder, as `run_class` handles (`runs.RunStore`: `runs.Run`)."""

    run_class: type[R]

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser().resolve() if root else default_root().resolve()

    def create(self, spec: Spec, job: str = "train") -> R:
        """A new run folder for `spec`; `job` is "train" or "prepare" (data preparation only)."""
        from .spec import deepspeed_config

        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
            run_id = f"{stamp}-{spec.name}-{secrets.token_hex(2)}"
            if not (self.root / run_id).exists():
                break
        else:  # pragma: no cover - needs 100 collisions of 16 random bits in one ms
            raise RuntimeError("could not allocate a unique run id")
        # Built under a hidden name and renamed into place: a lister never sees half a run
        # folder, and one that cannot be written (a full disk) leaves nothing behind.
        tmp = self.root / f".creating-{run_id}"
        try:
            tmp.mkdir()
            (tmp / LOGS_DIR).mkdir()
            (tmp / SPEC_FILE).write_text(spec.to_yaml(), encoding="utf-8")
            write_json_atomic(tmp / DS_CONFIG_FILE, deepspeed_config(spec, run_id))
            write_status(tmp, State.CREATED, run_id=run_id, name=spec.name, job=job, created_at=now_iso())
            record_event(tmp, Event.CREATED)
            tmp.rename(self.root / run_id)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(self.root, e, "a new run folder") from None
        return self.run_class(self.root / run_id)

    def list(self) -> list[R]:
        """Every run folder, oldest first; a damaged one too (its state reads `damaged`)."""
        if not self.root.is_dir():
            return []
        return [
            self.run_class(p)
            for p in sorted(self.root.iterdir())
            if RUN_ID_RE.match(p.name)
            and not p.is_symlink()
            and ((p / STATUS_FILE).exists() or (p / SPEC_FILE).exists())
        ]

    def get(self, run_id: str | None = None) -> R:
        """A run by id, unique id prefix, or name; the newest run when `run_id` is None."""
        runs = self.list()
        if run_id is None or run_id in ("latest", "last"):
            if not runs:
                raise RunNotFound(f"no runs under {self.root}; start one with `jupyter-llm train SPEC`")
            return runs[-1]
        if not RUN_ID_RE.match(run_id):
            raise RunNotFound(f"{run_id!r} is not a run id (letters, digits, '.', '_', '-')")
        exact = [r for r in runs if r.id == run_id]
        if exact:
            return exact[0]
        matches = [r for r in runs if r.id.startswith(run_id)] or [r for r in runs if r.name == run_id]
        if not matches:
            raise RunNotFound(f"no run {run_id!r} under {self.root}; `jupyter-llm runs` lists them")
        if len(matches) > 1 and not all(r.name == run_id for r in matches):
            ids = ", ".join(r.id for r in matches[:5])
            raise RunNotFound(f"{run_id!r} matches several runs ({ids}); give more of the id")
        return matches[-1]


# -- one run ------------------------------------------------------------------------------


class JobFolder:
    """A folder whose process reports its own state in status.json (created → starting →
    running → a terminal state): what run folders and detached jobs (evaluations, the sweep
    controller) share. Reading never writes: a job that reads as live while its recorded
    process is gone is reported `failed` with `lost: true`."""

    what = "job process"  # named in the message of a lost job
    hint = ""  # what to do about a lost job

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.id = self.path.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, state={self.state!r})"

    def __eq__(self, other: object) -> bool:  # (a Run and a RunFolder of one folder are equal)
        return isinstance(other, JobFolder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def status_raw(self) -> dict[str, Any] | None:
        """status.json as written (any format), or None when there is none."""
        return read_json(self.path / STATUS_FILE)

    def read_status(self) -> dict[str, Any]:
        """status.json as recorded (no liveness check); a folder without one is `created`."""
        return self.status_raw() or {"state": State.CREATED.value}

    def status(self) -> dict[str, Any]:
        """status.json, with a live-looking job whose process is gone reported as failed."""
        st = self.read_status()
        state = State(st["state"])
        if state.terminal or state == State.CREATED:
            return st
        if self.alive(st):
            return st
        gone = f"the {self.what} (pid {st.get('pid')}) is gone{self.hint}"
        return {**st, "state": State.FAILED.value, "lost": True, "error": st.get("error") or gone}

    @staticmethod
    def alive(st: dict[str, Any]) -> bool:
        """The process status.json records is running (the same pid and start time)."""
        return process_alive(st.get("pid"), st.get("pid_create_time"))

    @property
    def state(self) -> str:
        return str(self.status()["state"])

    @property
    def done(self) -> bool:
        return State(self.state).terminal

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        """Block until the job ends; returns the final state. TimeoutError past `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not State(state := self.state).terminal:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.id} still {state} after {timeout} s")
            time.sleep(poll)
        return state


class RunFolder(JobFolder):
    """A reading handle on one run folder (and its stop request). Cheap to create; every read
    goes to disk. `runs.Run` adds what starts jobs: resume and evaluate."""

    what = "supervisor"
    hint = "; resume() continues from its newest checkpoint"

    # -- reading ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str((self.status_raw() or {}).get("name") or self.id)

    @functools.cached_property
    def spec(self) -> Spec:
        """The run's spec (read once: only a resume onto other ranks rewrites spec.yaml)."""
        from .spec import Spec

        return Spec.from_yaml((self.path / SPEC_FILE).read_text(encoding="utf-8"))

    @property
    def ds_config(self) -> dict[str, Any]:
        return json.loads((self.path / DS_CONFIG_FILE).read_text(encoding="utf-8"))

    def read_status(self) -> dict[str, Any]:
        """status.json in format 1's names (any format read); `damaged` when unreadable.

        Readers never write status.json (the supervisor owns it); `status()` reports a run
        whose supervisor vanished (SIGKILL, machine reboot) as `failed` with `lost: true`.
        """
        try:
            raw = json.loads((self.path / STATUS_FILE).read_bytes())
            return RunStatus.model_validate(raw).model_dump(mode="json")
        except FileNotFoundError:
            if not self.path.is_dir():
                raise RunNotFound(f"{self.path} is not a run folder") from None
            return self._damaged("it has no status.json")
        except (OSError, ValueError) as e:  # JSON, UTF-8 and pydantic errors are ValueErrors
            return self._damaged(f"its status.json cannot be read ({_first_line(e)})")

    def _damaged(self, why: str) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "state": State.DAMAGED.value,
            "run_id": self.id,
            "name": None,
            "damaged": True,
            "error": f"damaged: {why}; its other files are untouched (spec.yaml, checkpoints/, final/)",
        }

    def metrics(self, dedupe: bool = True) -> list[dict[str, Any]]:
        """Lines of metrics.jsonl. With `dedupe`, a step logged again after a resume keeps
        only its newest line (train and eval lines separately)."""
        lines = appended_lines(self.path / METRICS_FILE)
        if not dedupe:
            return lines
        keep: dict[tuple[int, bool], dict[str, Any]] = {}
        for line in lines:
            keep[(int(line.get("step", -1)), "val_loss" in line)] = line
        return sorted(keep.values(), key=lambda m: (m.get("step", -1), "val_loss" in m))

    def system(self) -> list[dict[str, Any]]:
        """System utilisation while it ran: {time, node, cpu_pct, mem_used_mb, ranks_cpu_pct,
        ranks_rss_mb, gpus: [{index, util_pct, mem_used_mb, mem_total_mb}], ...} per sample."""
        return read_jsonl(self.path / SYSTEM_FILE)[0]

    def samples(self) -> list[dict[str, Any]]:
        """Text generated while training (`train.sample_every`): {step, time, prompt, output}."""
        return read_jsonl(self.path / SAMPLES_FILE)[0]

    def grad_norms(self) -> list[dict[str, Any]]:
        """Per-layer gradient norms ({step, time, norms}) when `train.grad_norms_every` is set."""
        return read_jsonl(self.path / GRADS_FILE)[0]

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / EVENTS_FILE)[0]

    def manifest(self) -> dict[str, Any] | None:
        return read_json(self.path / MANIFEST_FILE)

    def log_tail(self, n: int = 20, rank: int | None = None) -> list[str]:
        """Last `n` lines of a rank's log, or of the launcher's log when `rank` is None."""
        f = self.path / "logs" / ("launcher.log" if rank is None else f"rank{rank}.log")
        try:
            with open(f, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024 * max(1, n // 100)))
                data = fh.read()
        except FileNotFoundError:
            return []
        return data.decode("utf-8", "replace").splitlines()[-n:]

    def logs(
        self, n: int = 40, rank: int | None = None, follow: bool = False, poll: float = 0.5
    ) -> Iterator[str]:
        """The last `n` log lines; with `follow`, then every new line until the run ends (read
        from where the last read ended: a long log is not read again at each poll)."""
        f = self.path / "logs" / ("launcher.log" if rank is None else f"rank{rank}.log")
        offset, partial = 0, b""

        def new_lines() -> list[str]:
            nonlocal offset, partial
            try:
                with open(f, "rb") as fh:
                    if os.fstat(fh.fileno()).st_size < offset:  # replaced or truncated: from the start
                        offset, partial = 0, b""
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                return []
            offset += len(data)
            *whole, partial = (partial + data).split(b"\n")
            return [line.decode("utf-8", "replace").rstrip("\r") for line in whole]

        first = new_lines()
        yield from first[-n:] if n else []
        while follow:
            done = self.done
            yield from new_lines()
            if done:
                if partial:
                    yield partial.decode("utf-8", "replace")
                return
            time.sleep(poll)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        ck = self.path / "checkpoints"
        if not ck.is_dir():
            return []
        done = []
        for p in ck.iterdir():
            marker = read_json(p / CKPT_MARKER) if p.is_dir() else None
            if marker and isinstance(marker.get("step"), int):
                done.append((marker["step"], p))
        return [p for _, p in sorted(done)]

    def checkpoint_mb(self) -> float:
        """The newest complete checkpoint's size (MB; 0 without one): what the next will take."""
        ckpts = self.checkpoints()
        return tree_mb(ckpts[-1]) if ckpts else 0.0

    @property
    def final_model(self) -> Path | None:
        f = self.path / "final"
        return f if (f / "config.json").is_file() else None

    def follow(self, poll: float = 0.5, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield metrics lines as they are appended, until the run ends."""
        tail, deadline = (
            Tail(self.path / METRICS_FILE),
            None if timeout is None else time.monotonic() + timeout,
        )
        while True:
            done = self.done
            yield from tail.read()
            if done or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll)

    # -- acting -------------------------------------------------------------------------

    def stop(self, wait: bool = False, timeout: float | None = None) -> str:
        """Ask the supervisor to stop the job: the ranks save a checkpoint and exit.

        If they have not finished within the spec's `train.stop_grace_s`, the supervisor
        escalates SIGINT → SIGTERM → SIGKILL on the job's own process group.
        """
        st = self.status()
        state = State(st["state"])
        if state.terminal:
            return state.value
        if state == State.CREATED:
            raise RunStateError(f"run {self.id} was never started")
        try:
            os.kill(int(st["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        if wait:
            return self.wait(timeout)
        return self.state


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


class RunFolders(FolderStore[RunFolder]):
    """The store as the layers under `runs` see it: reading handles only."""

    run_class = RunFolder
