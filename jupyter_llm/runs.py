"""The run store and the `Run` handle: everything here reads or creates run folders.

The run folder is the only protocol between the kernel, the CLI, the supervisor and the
ranks. This module never imports torch; a `Run` can be rebuilt from its folder alone.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunNotFound, RunStateError, UserError

if TYPE_CHECKING:
    from .spec import Spec

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CKPT_MARKER = "COMPLETE"  # a checkpoint folder counts only once this file exists


class State(str, Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    RESUMING = "resuming"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in (State.COMPLETED, State.FAILED, State.STOPPED)


# -- small file helpers (shared by every writer) -----------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line with a single write (O_APPEND), so concurrent appenders never interleave."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete line.

    A half-written last line (a writer mid-append) is left for the next read.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for raw in data[:end].splitlines():
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer; skip it
    return out, offset + end


_tails: dict[str, tuple[int, int, list[dict[str, Any]]]] = {}  # path -> (inode, offset, lines)
_tails_lock = threading.Lock()


def _appended_lines(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's lines, reading only what was appended since this process last read it
    (the runs table, the sidebar's API and `%llm_runs` poll every run's metrics every few
    seconds); a replaced or truncated file is read again from the start."""
    key = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        with _tails_lock:
            _tails.pop(key, None)
        return []
    with _tails_lock:
        inode, offset, lines = _tails.get(key, (st.st_ino, 0, []))
        if inode != st.st_ino or st.st_size < offset:
            offset, lines = 0, []
        if st.st_size > offset:
            new, offset = read_jsonl(path, offset)
            lines = lines + new
        _tails[key] = (st.st_ino, offset, lines)
        return list(lines)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """Is `pid` running and (when given) the same process that was recorded?"""
    if not pid:
        return False
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


# -- the store ----------------------------------------------------------------------------


def default_root() -> Path:
    """$JUPYTER_LLM_RUNS, else $JUPYTER_LLM_HOME/runs, else ./llm-runs."""
    if runs := os.environ.get("JUPYTER_LLM_RUNS"):
        return Path(runs).expanduser()
    home = os.environ.get("JUPYTER_LLM_HOME")
    return (Path(home).expanduser() / "runs") if home else Path.cwd() / "llm-runs"


class RunStore:
    """All runs under one root folder."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser().resolve() if root else default_root().resolve()

    def create(self, spec: Spec, job: str = "train") -> Run:
        """A new run folder for `spec`; `job` is "train" or "prepare" (data preparation only)."""
        from .spec import deepspeed_config

        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
            run_id = f"{stamp}-{spec.name}-{secrets.token_hex(2)}"
            path = self.root / run_id
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - needs 100 collisions of 16 random bits in one ms
            raise RuntimeError("could not allocate a unique run id")
        (path / "logs").mkdir()
        (path / "spec.yaml").write_text(spec.to_yaml(), encoding="utf-8")
        write_json_atomic(path / "ds_config.json", deepspeed_config(spec, run_id))
        run = Run(path)
        write_json_atomic(
            path / "status.json",
            {
                "state": State.CREATED.value,
                "run_id": run_id,
                "name": spec.name,
                "pid": None,
                "created_at": now_iso(),
                "started_at": None,
                "ended_at": None,
                "exit_code": None,
                "error": None,
                "job": job,
            },
        )
        append_jsonl(path / "events.jsonl", {"time": now_iso(), "event": "created"})
        return run

    def list(self) -> list[Run]:
        if not self.root.is_dir():
            return []
        return [
            Run(p)
            for p in sorted(self.root.iterdir())
            if RUN_ID_RE.match(p.name) and (p / "status.json").is_file() and not p.is_symlink()
        ]

    def get(self, run_id: str | None = None) -> Run:
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


# what a resume may change (Run.resume): where the run runs, not what it trains
RESUME_KEYS = ("distributed.procs_per_node", "distributed.nodes", "distributed.tensor_parallel",
               "train.micro_batch_size", "train.grad_accum")  # fmt: skip


class Run:
    """A handle on one run folder. Cheap to create; every read goes to disk."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.id = self.path.name

    def __repr__(self) -> str:
        return f"Run({self.id!r}, state={self.state!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- reading ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str((self.status_raw() or {}).get("name") or self.id)

    @functools.cached_property
    def spec(self) -> Spec:
        """The run's spec (read once: only a resume onto other ranks rewrites spec.yaml)."""
        from .spec import Spec

        return Spec.from_yaml((self.path / "spec.yaml").read_text(encoding="utf-8"))

    @property
    def ds_config(self) -> dict[str, Any]:
        return json.loads((self.path / "ds_config.json").read_text(encoding="utf-8"))

    def status_raw(self) -> dict[str, Any] | None:
        return read_json(self.path / "status.json")

    def status(self) -> dict[str, Any]:
        """status.json, with a dead supervisor of a live-looking run reported as failed.

        Readers never write status.json (the supervisor owns it); a run whose supervisor
        vanished (SIGKILL, machine reboot) shows state `failed` with `lost: true`.
        """
        st = self.status_raw()
        if st is None:
            raise RunNotFound(f"{self.path} is not a run folder (no status.json)")
        state = State(st["state"])
        lost = not state.terminal and state != State.CREATED
        if lost and not process_alive(st.get("pid"), st.get("pid_create_time")):
            st = {
                **st,
                "state": State.FAILED.value,
                "lost": True,
                "error": st.get("error") or f"supervisor (pid {st.get('pid')}) is gone",
            }
        return st

    @property
    def state(self) -> str:
        return str(self.status()["state"])

    @property
    def done(self) -> bool:
        return State(self.state).terminal

    def metrics(self, dedupe: bool = True) -> list[dict[str, Any]]:
        """Lines of metrics.jsonl. With `dedupe`, a step logged again after a resume keeps
        only its newest line (train and eval lines separately)."""
        lines = _appended_lines(self.path / "metrics.jsonl")
        if not dedupe:
            return lines
        keep: dict[tuple[int, bool], dict[str, Any]] = {}
        for line in lines:
            keep[(int(line.get("step", -1)), "val_loss" in line)] = line
        return sorted(keep.values(), key=lambda m: (m.get("step", -1), "val_loss" in m))

    def grad_norms(self) -> list[dict[str, Any]]:
        """Per-layer gradient norms ({step, time, norms}) when `train.grad_norms_every` is set."""
        return read_jsonl(self.path / "grads.jsonl")[0]

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "events.jsonl")[0]

    def manifest(self) -> dict[str, Any] | None:
        return read_json(self.path / "manifest.json")

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
        """The last `n` log lines; with `follow`, then every new line until the run ends."""
        seen = self.log_tail(1_000_000, rank)
        yield from seen[-n:] if n else []
        while follow:
            done = self.done
            now = self.log_tail(1_000_000, rank)
            yield from now[len(seen) :]
            seen = now
            if done:
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

    @property
    def final_model(self) -> Path | None:
        f = self.path / "final"
        return f if (f / "config.json").is_file() else None

    def follow(self, poll: float = 0.5, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield metrics lines as they are appended, until the run ends."""
        offset, deadline = 0, None if timeout is None else time.monotonic() + timeout
        while True:
            done = self.done
            lines, offset = read_jsonl(self.path / "metrics.jsonl", offset)
            yield from lines
            if done or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll)

    # -- acting -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        """Block until the run ends; returns the final state. TimeoutError past `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.state
            if State(state).terminal:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.id} still {state} after {timeout} s")
            time.sleep(poll)

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

    def resume(self, overrides: list[str] | dict[str, Any] | None = None) -> Run:
        """Start the job again; the ranks continue from the newest complete checkpoint.

        `overrides` (`KEY=VALUE` or a dict) may change where it runs, and nothing else: the
        ranks (distributed.procs_per_node, distributed.nodes), distributed.tensor_parallel and
        the batch (train.micro_batch_size, train.grad_accum). On other ranks the worker loads
        the checkpoint through DeepSpeed's universal format; the data position continues by
        sample count. The previous values are kept in the `resume_overrides` event."""
        st = self.status()
        if not State(st["state"]).terminal:
            raise RunStateError(f"run {self.id} is {st['state']}; stop it before resuming")
        if st["state"] == State.COMPLETED.value:
            raise RunStateError(f"run {self.id} already completed; nothing to resume")
        if overrides:
            self._relayout(overrides)
        from .launcher import start

        start(self, resume=True)
        return self

    def _relayout(self, overrides: list[str] | dict[str, Any]) -> None:
        import yaml

        from .spec import Spec, apply_overrides, deepspeed_config, split_override

        items = dict(overrides.items() if isinstance(overrides, dict) else map(split_override, overrides))
        if bad := sorted(set(items) - set(RESUME_KEYS)):
            raise UserError(f"resume cannot change {', '.join(bad)}: the run's model, data and schedule "
                            f"stay; it may change {', '.join(RESUME_KEYS)} (or start a new run from its spec)")  # fmt: skip
        raw = yaml.safe_load((self.path / "spec.yaml").read_text(encoding="utf-8"))
        new = Spec.from_dict(apply_overrides(raw, items), check_files=False)  # SpecError names the key
        old, now = self.spec.to_dict(), new.to_dict()

        def value(d: dict[str, Any], key: str) -> Any:
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
            return d

        changes = {
            k: {"from": value(old, k), "to": value(now, k)} for k in items if value(old, k) != value(now, k)
        }
        if not changes:
            return
        if "distributed.nodes" in changes:
            from .cluster import resolve
            from .launcher.multinode import CLUSTER_FILE, write_cluster

            cluster = resolve(new.distributed.nodes)
            if cluster is not None:
                write_cluster(self.path, cluster)
            else:
                (self.path / CLUSTER_FILE).unlink(missing_ok=True)
        append_jsonl(
            self.path / "events.jsonl", {"time": now_iso(), "event": "resume_overrides", "changes": changes}
        )
        write_json_atomic(self.path / "ds_config.json", deepspeed_config(new, self.id))
        tmp = self.path / ".spec.yaml.tmp"
        tmp.write_text(new.to_yaml(), encoding="utf-8")
        os.replace(tmp, self.path / "spec.yaml")
        self.__dict__.pop("spec", None)

    def evaluate(self, wait: bool = False, timeout: float | None = None, **params: Any) -> Any:
        """Evaluate this run's final model (or `checkpoint=`) as a detached job; see
        `jupyter_llm.evaluation.evaluate` for the parameters. Returns the Evaluation."""
        from .evaluation import evaluate

        return evaluate(self, wait=wait, timeout=timeout, **params)

    def evaluations(self) -> list[Any]:
        from .evaluation import evaluations

        return evaluations(self)

    def summary(self) -> str:
        from .display import run_text

        return run_text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())

    def _repr_html_(self) -> str:
        from .display import run_html

        return run_html(self)

    def _ipython_display_(self) -> None:
        """In a notebook: the live dashboard (widgets); elsewhere the text summary."""
        from IPython.display import display

        from .widgets import Dashboard

        display(Dashboard(self))


class _CallableModule(types.ModuleType):
    """`jupyter_llm.runs` is both this module and the public `runs()` listing.

    Importing the submodule rebinds the package attribute `runs` to the module, so the
    module itself answers the call: `jupyter_llm.runs()` lists runs, `jupyter_llm.runs.Run`
    is the handle class.
    """

    def __call__(self, root: str | os.PathLike[str] | None = None) -> list[Run]:
        return RunStore(root).list()


sys.modules[__name__].__class__ = _CallableModule
