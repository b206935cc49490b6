"""The node agent: what the supervisor runs on a remote node over ssh.

    python -m jupyter_llm.launcher.node probe --workdir W [--addr A --port P] [--expect PATH]
    python -m jupyter_llm.launcher.node run RUN_DIR --node-rank N --attempt K --master-addr A
        --master-port P [--data REL] [--data-ready] [--pretrained REL]
    python -m jupyter_llm.launcher.node reap TAG

`probe` prints one JSON line of facts (versions, cores, GPUs, free disk, whether the master
port is free) and touches nothing. `run` starts DeepSpeed's launcher for this node
(`--no_ssh --node_rank N`) in a process group of its own, records it in
`RUN_DIR/nodes/nodeN.json`, relays its output, and reads stdin: first a JSON line with the
ranks' variables (`{"env": {...}}`: never on a command line), then commands, one per line:
`stop` (the stop file the ranks look for), `signal INT|TERM|KILL` (to its group only). When
stdin closes (the supervisor or its ssh connection is gone) the group is killed: a job never
outlives the process watching it. The last line it prints is
`JUPYTER_LLM_NODE_RESULT {json}`: the exit code and, on failure, which rank failed and why.
`reap TAG` kills the processes whose environment carries JUPYTER_LLM_JOB=TAG (pdsh launches).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .local import kill_group, signal_group

RESULT = "JUPYTER_LLM_NODE_RESULT"
STARTED = "JUPYTER_LLM_NODE_STARTED"
DISTS = ("jupyter-llm", "torch", "deepspeed", "transformers")


def versions() -> dict[str, str | None]:
    """python and the distributions that must match on every node (no imports of them)."""
    out: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def probe(
    workdir: str, addr: str | None, port: int | None, expect: str | None, nvme: str | None = None
) -> dict[str, Any]:
    """Facts about this node for the pre-flight; imports no torch. `resources`: what a job
    started here has (host memory, the cgroup's room included; free GPU memory; free space in
    the NVMe folder, or why it cannot hold swap files) for `zero_stage`/`offload: auto`."""
    from .. import fit
    from ..devices import gpu_count

    wd = Path(os.path.expanduser(workdir)).absolute()
    existing = wd
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "versions": versions(),
        "cpus": os.cpu_count() or 1,
        "gpus": gpu_count(),
        "workdir": str(wd),
        "disk_free": shutil.disk_usage(existing).free,
        "writable": os.access(existing, os.W_OK),
        "rsync": shutil.which("rsync") is not None,
        "resources": fit.probe(nvme).to_dict(),
    }
    if addr is not None:
        facts["port_free"] = _bindable(addr, port or 0)
        facts["free_port"] = _pick_port(addr)
    if expect is not None:
        facts["expect_exists"] = Path(expect).is_dir()
    return facts


def _bindable(addr: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
        return True


def _pick_port(addr: str) -> int | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return None
        return int(s.getsockname()[1])


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir = Path(os.path.expanduser(args.run_dir)).absolute()
        self.node = args.node_rank
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.first_dead: dict[str, Any] | None = None
        self.lock = threading.Lock()
        self.out = sys.stdout

    def say(self, line: str) -> None:
        with self.lock:
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the connection is gone; stdin's EOF ends the job
                pass

    def main(self) -> int:
        from ..folder import PARENT_ENV
        from .local import parent_tag, rank_env

        a = self.args
        os.chdir(self.run_dir)
        for sub in ("logs", "control", "nodes"):
            (self.run_dir / sub).mkdir(exist_ok=True)
        (self.run_dir / "control" / "stop").unlink(missing_ok=True)
        hello = json.loads(sys.stdin.readline() or "{}")  # the supervisor's first line
        extra = {str(k): str(v) for k, v in (hello.get("env") or {}).items()}
        env = rank_env(self.run_dir, a.attempt, a.slots, cpu=a.cpu, base_env={**os.environ, **extra},
                       loopback=a.master_addr.startswith("127."))  # fmt: skip
        if a.data is not None:  # prepared data synced into the run folder
            from ..files import write_json_atomic

            write_json_atomic(self.run_dir / "data.json", {"path": a.data, "cached": True})
        if a.data is not None or a.data_ready:
            env["JUPYTER_LLM_DATA_READY"] = "1"
        env[PARENT_ENV] = parent_tag()
        if a.pretrained is not None:
            env["JUPYTER_LLM_PRETRAINED"] = str(self.run_dir / a.pretrained)
        # this node's ranks from the hostfile's slots (the world's layout, nodes in order), started
        # as on this machine (launcher.ranks: no DeepSpeed import in front of them)
        slots = [int(line.split("slots=")[1]) for line in (self.run_dir / "hostfile").read_text().splitlines()
                 if "slots=" in line]  # fmt: skip
        argv = [
            sys.executable, "-u", "-m", "jupyter_llm.launcher.ranks", f"--ranks={a.slots}",
            f"--first-rank={sum(slots[: self.node])}", f"--world-size={sum(slots)}",
            f"--node-rank={self.node}", f"--nodes={len(slots)}",
            f"--master-addr={a.master_addr}", f"--master-port={a.master_port}",
            *([] if a.cpu else [f"--devices={','.join(map(str, range(a.slots)))}"]),
            "jupyter_llm.train", str(self.run_dir),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, env=env, cwd=self.run_dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        record = {"node_rank": self.node, "attempt": a.attempt, "agent_pid": os.getpid(),
                  "job_pgid": self.proc.pid, "hostname": socket.gethostname(), "argv": sys.argv,
                  "env_keys": sorted(extra), "time": time.time()}  # fmt: skip
        from ..files import write_json_atomic

        write_json_atomic(self.run_dir / "nodes" / f"node{self.node}.json", record)
        self.say(f"{STARTED} {json.dumps(record)}")
        threading.Thread(target=self._relay, daemon=True).start()
        threading.Thread(target=self._commands, daemon=True).start()
        from .system import SYSTEM_MARK, Sampler, rank_pids
        from .watch import rank_records

        system = Sampler(self.run_dir, node=f"node{self.node} ({socket.gethostname()})",
                         sink=lambda line: self.say(f"{SYSTEM_MARK} {json.dumps(line)}"))  # fmt: skip
        while (rc := self.proc.poll()) is None:
            time.sleep(0.25)
            if self.first_dead is None:
                from .watch import first_dead_rank

                self.first_dead = first_dead_rank(self.run_dir, a.attempt)
            system.sample(lambda: rank_pids(rank_records(self.run_dir, a.attempt)))
        self._kill()
        result: dict[str, Any] = {"node_rank": self.node, "exit_code": rc, "hostname": socket.gethostname()}
        if swap := self._remove_swap():
            result["swap_removed"] = swap
        if rc != 0:
            from .watch import diagnose

            time.sleep(0.2)  # the relay thread's last lines
            failure = diagnose(self.run_dir, a.attempt, rc, self.first_dead, list(self.tail))
            result["error"], result["failure"] = failure.sentence(), failure.model_dump()
        self.say(f"{RESULT} {json.dumps(result)}")
        return 0 if rc == 0 else 1

    def _remove_swap(self) -> str | None:
        """offload: nvme: this node's swap files are scratch (the checkpoints hold the state)."""
        from ..errors import UserError
        from ..spec import Spec, swap_dir

        try:
            swap = swap_dir(Spec.load(self.run_dir / "spec.yaml"), self.run_dir.name)
        except (OSError, UserError):  # no readable spec: no swap folder of ours either
            return None
        if swap and os.path.isdir(swap):
            shutil.rmtree(swap, ignore_errors=True)
            return swap
        return None

    def _relay(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            self.say(line)

    def _commands(self) -> None:
        for line in sys.stdin:
            cmd = line.split()
            if cmd == ["stop"]:
                from ..files import now_iso, write_json_atomic

                write_json_atomic(
                    self.run_dir / "control" / "stop", {"requested_at": now_iso(), "by": "supervisor"}
                )
            elif len(cmd) == 2 and cmd[0] == "signal" and cmd[1] in ("INT", "TERM", "KILL"):
                self._signal(getattr(signal, "SIG" + cmd[1]))
        self._kill()  # stdin closed: nobody watches this job any more

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            signal_group(self.proc.pid, sig)

    def _kill(self) -> None:
        """SIGKILL the group and wait until nothing of it is left."""
        if self.proc is not None:
            kill_group(self.proc.pid)


def reap(tag: str) -> list[int]:
    from .watch import reap_orphans

    run_id, _, _ = tag.partition(":")
    return reap_orphans(run_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jupyter_llm.launcher.node")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--workdir", required=True)
    p.add_argument("--addr")
    p.add_argument("--port", type=int)
    p.add_argument("--expect")
    p.add_argument("--nvme")
    r = sub.add_parser("run")
    r.add_argument("run_dir")
    r.add_argument("--node-rank", type=int, required=True)
    r.add_argument("--attempt", type=int, required=True)
    r.add_argument("--slots", type=int, required=True)
    r.add_argument("--master-addr", required=True)
    r.add_argument("--master-port", type=int, required=True)
    r.add_argument("--cpu", action="store_true")
    r.add_argument("--data")
    r.add_argument("--data-ready", action="store_true")
    r.add_argument("--pretrained")
    k = sub.add_parser("reap")
    k.add_argument("tag")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(args.workdir, args.addr, args.port, args.expect, args.nvme)))
        return 0
    if args.cmd == "reap":
        print(json.dumps({"reaped": reap(args.tag)}))
        return 0
    return Agent(args).main()


if __name__ == "__main__":
    sys.exit(main())
