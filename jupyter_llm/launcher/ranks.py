"""The ranks of one node: `python -m jupyter_llm.launcher.ranks --ranks N --master-port P MODULE ARGS`.

What DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) does for a job, without what it
costs: that launcher imports DeepSpeed and torch only to read its arguments (2-7 s on these
machines, serial, in front of every run and every restart; this module imports neither) and
polls its ranks once a second (up to 1 s more at every end; here a rank's end is seen as it
happens). The same environment per rank (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK,
CROSS_SIZE, MASTER_ADDR, MASTER_PORT, and CUDA_VISIBLE_DEVICES with `--devices`), the same
contract: the first rank that fails makes the others stop (SIGTERM, SIGKILL after
`KILL_AFTER_S`) and its exit code is this process's; SIGINT or SIGTERM to this process is passed
to the ranks (SIGTERM), and it exits 1 once they are gone. The supervisor signals the whole
process group; this process waits for the ranks either way.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time

KILL_AFTER_S = 30.0  # after a failure or a signal, the ranks still alive get SIGKILL then


def rank_environments(
    ranks: int, *, first_rank: int, world_size: int, node_rank: int, nodes: int, master_addr: str,
    master_port: int, devices: list[int] | None, base: dict[str, str],
) -> list[dict[str, str]]:  # fmt: skip
    """Each local rank's environment, as DeepSpeed's launcher sets it."""
    shared = {
        **base,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(world_size),
        "CROSS_RANK": str(node_rank),
        "CROSS_SIZE": str(nodes),
        "LOCAL_SIZE": str(ranks),
    }
    if devices is not None:
        shared["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return [{**shared, "RANK": str(first_rank + r), "LOCAL_RANK": str(r)} for r in range(ranks)]


def run(cmd: list[str], envs: list[dict[str, str]]) -> int:
    """Start one process per environment; wait for all. The first nonzero exit stops the rest
    and is returned; 0 when every rank exited 0.

    A thread per rank waits on it (Popen.wait: every rank is reaped once, by its own Popen) and
    hands it over as it ends, so a rank's end is seen at once; the main thread wakes twice a
    second only to send SIGKILL once a failure's or a signal's grace has run out."""
    procs = [subprocess.Popen(cmd, env=env) for env in envs]
    ended: queue.Queue[tuple[subprocess.Popen[bytes], str]] = queue.Queue()

    def wait_on(p: subprocess.Popen[bytes], rank: str) -> None:
        p.wait()
        ended.put((p, rank))

    for p, env in zip(procs, envs, strict=True):
        threading.Thread(target=wait_on, args=(p, env["RANK"]), daemon=True).start()
    failed: int | None = None
    deadline: float | None = None  # the SIGKILL time, once the ranks were asked to stop

    def stop_all(sig: int) -> None:
        for p in procs:
            try:
                p.send_signal(sig)  # (nothing to a rank already reaped)
            except ProcessLookupError:
                pass

    def give_up(code: int) -> None:
        nonlocal failed, deadline
        failed = code if failed is None else failed
        if deadline is None:
            deadline = time.monotonic() + KILL_AFTER_S
            stop_all(signal.SIGTERM)

    signal.signal(signal.SIGINT, lambda signum, frame: give_up(1))  # 1: as DeepSpeed's launcher exits
    signal.signal(signal.SIGTERM, lambda signum, frame: give_up(1))
    for _ in procs:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                stop_all(signal.SIGKILL)
            try:
                p, rank = ended.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        if p.returncode != 0 and failed is None:
            # the line (and its wording) DeepSpeed's launcher writes: watch.diagnose reads the
            # failed rank's exit code or signal from it (negative: killed by that signal)
            print(
                f"[jupyter-llm] rank {rank} (pid {p.pid}) exits with return code = {p.returncode}", flush=True
            )
            give_up(p.returncode if p.returncode > 0 else 128 - p.returncode)
    return failed or 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jupyter_llm.launcher.ranks", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--ranks", type=int, required=True, help="ranks on this node")
    ap.add_argument("--first-rank", type=int, default=0, help="the global rank of this node's first")
    ap.add_argument("--world-size", type=int, help="ranks in all (default: --ranks)")
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--devices", help="the accelerators of this node's ranks, comma-separated (GPUs)")
    ap.add_argument("module", help="run as `python -u -m MODULE ARGS...` per rank")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.ranks < 1:
        ap.error("--ranks must be at least 1")
    devices = [int(d) for d in a.devices.split(",")] if a.devices else None
    envs = rank_environments(
        a.ranks, first_rank=a.first_rank, world_size=a.world_size or a.ranks, node_rank=a.node_rank,
        nodes=a.nodes, master_addr=a.master_addr, master_port=a.master_port, devices=devices,
        base=dict(os.environ),
    )  # fmt: skip
    last = a.first_rank + a.ranks - 1
    print(f"[jupyter-llm] node {a.node_rank}: ranks {a.first_rank}..{last} of {a.world_size or a.ranks}"
          f" (master {a.master_addr}:{a.master_port})", flush=True)  # fmt: skip
    return run([sys.executable, "-u", "-m", a.module, *a.args], envs)


if __name__ == "__main__":
    sys.exit(main())
