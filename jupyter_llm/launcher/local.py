"""The local backend: a pure `(run, ranks, port) -> (argv, env)` builder of the ranks' launch."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..devices import visible_gpus


def build_command(
    run_dir: Path,
    nprocs: int,
    port: int,
    *,
    attempt: int = 1,
    cpu: bool = True,
    python: str = sys.executable,
    base_env: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The exact command and environment that start `nprocs` ranks of the worker on this
    machine: `launcher.ranks`, which sets each rank's environment as DeepSpeed's per-node
    launcher does without importing DeepSpeed and torch first (measured: 2-7 s before every
    start; DeepSpeed's runner in front of that launcher had cost 1.8 s more). On GPUs under
    CUDA_VISIBLE_DEVICES, the first `nprocs` of those GPUs."""
    visible = None if cpu else visible_gpus(os.environ if base_env is None else base_env)
    devices = None if cpu else (list(range(nprocs)) if visible is None else visible[:nprocs])
    argv = [
        python, "-u", "-m", "jupyter_llm.launcher.ranks",
        f"--ranks={nprocs}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        *([f"--devices={','.join(map(str, devices))}"] if devices is not None else []),
        "jupyter_llm.train",
        str(run_dir),
    ]  # fmt: skip
    env = rank_env(run_dir, attempt, nprocs, cpu=cpu, python=python, base_env=base_env, cores=cores)
    return argv, env


def rank_env(
    run_dir: Path | str,
    attempt: int,
    nprocs: int,
    *,
    cpu: bool,
    python: str = sys.executable,
    base_env: Mapping[str, str] | None = None,
    cores: int | None = None,
    loopback: bool = True,
) -> dict[str, str]:
    """The environment of a node's launcher and ranks (this machine, or a node's agent);
    `loopback`: every rank talks over 127.0.0.0/8 (one machine, or test nodes)."""
    env = job_env(Path(run_dir), attempt, base_env)
    # the interpreter's bin folder first, as an activated venv would have it: DeepSpeed's JIT
    # builds then find the venv's ninja, the one its ops were prebuilt with (no rebuild)
    bindir = os.path.dirname(python)
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env.update(
        {
            "PATH": os.pathsep.join([bindir, *[p for p in path if p != bindir]]),
            "JUPYTER_LLM_RUN_DIR": str(run_dir),
        }
    )
    if cpu:
        # one rank per core share; more threads than cores makes every rank slower
        env.setdefault("OMP_NUM_THREADS", str(max(1, (cores or os.cpu_count() or 1) // nprocs)))
        if loopback:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def job_env(run_dir: Path, attempt: int, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process of a job: the caller's, plus the tag by which
    orphans of this attempt are found (never by name pattern) and the attempt number."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(
        PYTHONUNBUFFERED="1", JUPYTER_LLM_JOB=f"{run_dir.name}:{attempt}", JUPYTER_LLM_ATTEMPT=str(attempt)
    )
    return env


def parent_tag() -> str:
    """This process as the ranks' parent (folder.PARENT_ENV): when it is gone they checkpoint
    and exit."""
    import psutil

    return f"{os.getpid()}:{psutil.Process().create_time()}"


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free, else a port the OS reports free on loopback."""
    if preferred is not None and port_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def signal_group(pgid: int, sig: int) -> None:
    """Signal one process group (a job started with start_new_session); gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(pgid: int, wait_s: float = 10.0) -> None:
    """SIGKILL a process group and wait until nothing of it runs. A zombie counts as gone: it
    holds no memory or files, and whoever it was reparented to reaps it in its own time (this
    machine's init took 1.5 s)."""
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if not group_running(pgid):
            return
        time.sleep(0.05)


def group_running(pgid: int) -> bool:
    """Does any process of group `pgid` run (not a zombie)?"""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
