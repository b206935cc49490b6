"""One runner per backend, behind one interface: `RUNNERS[name](attempt, cluster).run() -> rc`.

The names are the command builders' (`backends.BACKENDS`): local (this machine), ssh (one
agent per node), pdsh (DeepSpeed's own multi-node launcher), slurm (sbatch). A runner starts
its backend's commands and watches them; every decision (status, stop, hang, the final state)
is the attempt's (`attempt.Attempt`). A data-preparation job has its own runner.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Protocol

from ..cluster import Cluster
from ..devices import gpu_count
from ..files import now_iso, read_json, write_json_atomic
from ..folder import FAILURES_DIR, LOGS_DIR, MANIFEST_FILE, Event, State
from ..hashing import content_sha256
from ..provenance import git_sha, versions
from .attempt import Attempt
from .backends import backend_name, commands, local_node
from .local import free_port, job_env, port_free
from .multinode import PdshRunner, SlurmRunner, SshRunner
from .watch import diagnose


class Runner(Protocol):
    def run(self) -> int: ...


class LocalRunner:
    """This machine: DeepSpeed's per-node launcher in a process group of its own."""

    def __init__(self, att: Attempt, cluster: Cluster | None = None):
        self.att = att

    def run(self) -> int:
        att = self.att
        spec = att.run.spec
        ngpu = gpu_count()  # nvidia-smi: no torch import, no CUDA context here
        pp = spec.distributed.procs_per_node
        nprocs = pp if isinstance(pp, int) else (ngpu or 1)
        if ngpu and nprocs > ngpu:
            return att.fail(f"distributed.procs_per_node={nprocs} but this machine has {ngpu} GPU(s)")
        want = spec.distributed.master_port
        if want is not None and not port_free(want):
            return att.fail(f"distributed.master_port {want} is in use; remove it to pick a free port")
        port = free_port(want)  # picked just before launch: the window for a clash is short
        cmd = commands(
            spec, None, att.dir, port, [local_node(att.dir, nprocs)], attempt=att.number, cpu=not ngpu
        )[0]
        write_manifest(att, cmd.argv, nprocs, port)
        if att.stop_signal is not None:  # stopped before the job started
            return att.finish(State.STOPPED, 0, None)
        pgid = att.spawn(cmd.argv, cmd.env)
        att.event(
            Event.LAUNCHED,
            attempt=att.number,
            ranks=nprocs,
            master_port=port,
            command=cmd.argv,
            job_pgid=pgid,
        )
        att.set_status(State.RUNNING, job_pgid=pgid, world_size=nprocs, master_port=port)
        rc = att.watch(ranks=nprocs)
        att.kill_group()  # nothing of this job outlives it
        unlink_shm(port)

        def why() -> tuple[str, dict | None]:
            failure = diagnose(att.dir, att.number, rc, att.first_dead, att.run.log_tail(200))
            return failure.sentence(), failure.model_dump()

        return att.conclude(rc, why)


class PrepareRunner:
    """A data-preparation job: one process, no ranks; stop means SIGINT at once."""

    def __init__(self, att: Attempt, cluster: Cluster | None = None):
        self.att = att

    def run(self) -> int:
        att = self.att
        argv = [sys.executable, "-u", "-m", "jupyter_llm.train.prepare", str(att.dir)]
        write_manifest(att, argv, 1, 0)
        if att.stop_signal is not None:
            return att.finish(State.STOPPED, 0, None)
        pgid = att.spawn(argv, job_env(att.dir, att.number))
        att.event(Event.LAUNCHED, attempt=att.number, job="prepare", command=argv, job_pgid=pgid)
        att.set_status(State.RUNNING, job_pgid=pgid, world_size=1)
        rc = att.watch()
        att.kill_group()
        if rc == 0 and (att.dir / "data.json").is_file():
            return att.finish(State.COMPLETED, rc, None)
        if att.stop_signal is not None:
            return att.finish(State.STOPPED, rc, None)  # nothing half-written looks valid
        failure = read_json(att.dir / FAILURES_DIR / "rank0.json")
        if failure and failure.get("attempt") == att.number:
            return att.fail(f"preparation failed: {failure['type']}: {failure['message']}".strip(), rc)
        return att.fail(f"preparation exited with code {rc}; see {LOGS_DIR}/prepare.log", rc)


RUNNERS: dict[str, type[LocalRunner | SshRunner | PdshRunner | SlurmRunner]] = {
    "local": LocalRunner,
    "ssh": SshRunner,
    "pdsh": PdshRunner,
    "slurm": SlurmRunner,
}


def runner_for(att: Attempt, cluster: Cluster | None) -> Runner:
    """The runner of this attempt's job: its backend's (the spec's cluster), or preparation's."""
    if att.prepare_only:
        return PrepareRunner(att)
    return RUNNERS[backend_name(cluster)](att, cluster)


def write_manifest(att: Attempt, argv: list[str], nprocs: int, port: int) -> None:
    """manifest.json: what reproduces the run (versions, git sha, data hashes), plus this attempt."""
    spec = att.run.spec
    files = list(spec.data.train) + list(spec.data.validation or [])
    prev = read_json(att.dir / MANIFEST_FILE) or {}
    manifest = {
        "run_id": att.run.id,
        "spec": spec.to_dict(),
        "ds_config": att.run.ds_config,
        "seed": spec.seed,
        "versions": versions(),
        "git_sha": git_sha(os.environ.get("JUPYTER_LLM_CALLER_CWD")),
        "host": platform.node(),
        "data_files": {f: _sha256(f) for f in files} if not prev else prev.get("data_files"),
        "transform_sha256": _sha256(str(att.dir / "transform.pkl")),  # a notebook data transform
        "attempts": [*prev.get("attempts", []),
                     {"attempt": att.number, "time": now_iso(), "command": argv, "ranks": nprocs, "master_port": port}],
    }  # fmt: skip
    write_json_atomic(att.dir / MANIFEST_FILE, manifest)


def unlink_shm(port: int, addr: str = "127.0.0.1") -> list[str]:
    """Remove the /dev/shm all-reduce buffers of DeepSpeed's CPU shm backend for this job.

    DeepSpeed creates one ~70 MB segment per rank, named after uid, master address and port,
    and never unlinks them: left alone, every CPU run leaks RAM until the machine swaps.
    """
    gone = []
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        try:
            f.unlink()
        except OSError:
            continue
        gone.append(f.name)
    return gone


def _sha256(path: str) -> str | None:
    try:
        return content_sha256(path)
    except OSError:
        return None
