"""Remote and multi-node launch over ssh: the nodes and the pure command builders (ssh, rsync,
the probe, the node agent, pdsh), the agent's records read back, one quiet command run.

Every command is an argument list; what runs on a node is one `shlex.join`ed command line
(ssh hands the remote shell a string), so names and paths arrive verbatim. The spec travels
as a file in the synced run folder, never on a command line. Host keys are always checked
strictly (`BatchMode`, `StrictHostKeyChecking yes`): an unknown or changed key fails closed.
The pre-flight is in `probe`, the copies both ways in `sync`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cluster import Cluster, Host
from .node import RESULT, STARTED


@dataclass(frozen=True)
class Node:
    index: int  # node rank
    host: Host
    run_dir: str  # the run folder on the node (absolute once the pre-flight resolved it)
    slots: int  # ranks on this node

    @property
    def label(self) -> str:
        return f"node {self.index} ({self.host.label})"


# -- pure builders ------------------------------------------------------------------------


def ssh_options(cluster: Cluster, host: Host, control: str | None = None) -> list[str]:
    """ssh's options for one host (no destination, no command). `control`: a folder for
    connection sharing (the many short rsync calls of the sync reuse one connection)."""
    o = cluster.ssh
    out = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={o.connect_timeout}",
           "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]  # fmt: skip
    if o.config:
        out += ["-F", os.path.expanduser(o.config)]
    if o.known_hosts:
        out += ["-o", f"UserKnownHostsFile={os.path.expanduser(o.known_hosts)}"]
    if o.identity:
        out += ["-i", os.path.expanduser(o.identity), "-o", "IdentitiesOnly=yes"]
    for key, value in o.options.items():
        out += ["-o", f"{key}={value}"]
    if control is not None:
        out += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}/%C", "-o", "ControlPersist=60"]
    if host.port is not None:
        out += ["-p", str(host.port)]
    if host.user:
        out += ["-l", host.user]
    return out


def remote_line(cluster: Cluster, argv: list[str]) -> str:
    """The one command line the node's shell runs: the activation, then `argv` exactly."""
    line = "exec " + shlex.join(argv)
    return f"{cluster.activate} && {line}" if cluster.activate else line


def ssh_argv(cluster: Cluster, host: Host, argv: list[str]) -> list[str]:
    return ["ssh", *ssh_options(cluster, host), "--", host.host, remote_line(cluster, argv)]


def rsync_argv(
    cluster: Cluster,
    host: Host,
    src: str,
    dst: str,
    *,
    push: bool,
    extra: Sequence[str] = (),
    control: str | None = None,
) -> list[str]:
    """rsync over the same ssh options; the remote side of `src`/`dst` is a node path.
    `--secluded-args`: the paths travel inside rsync's protocol, never through the node's
    shell (rsync's default escaping does not survive a newline in a path)."""
    rsh = shlex.join(["ssh", *ssh_options(cluster, host, control)])
    remote = f"{host.host}:"
    pair = [src, remote + dst] if push else [remote + src, dst]
    return ["rsync", "-a", "--secluded-args", "--mkpath", "-e", rsh, *extra, *pair]


def probe_argv(
    cluster: Cluster, node: Node, addr: str | None, port: int | None, expect: str | None,
    nvme: str | None = None,
) -> list[str]:  # fmt: skip
    argv = [cluster.python, "-m", "jupyter_llm.launcher.node", "probe", "--workdir", node.run_dir]
    if addr is not None:
        argv += ["--addr", addr] + (["--port", str(port)] if port is not None else [])
    if expect is not None:
        argv += ["--expect", expect]
    if nvme is not None:
        argv += ["--nvme", nvme]
    return ssh_argv(cluster, node.host, argv)


def agent_argv(
    cluster: Cluster, node: Node, *, attempt: int, master_addr: str, master_port: int, cpu: bool,
    data: str | None, pretrained: str | None,
) -> list[str]:  # fmt: skip
    """The ssh command that runs the node agent (DeepSpeed's launcher, --no_ssh mode)."""
    argv = [cluster.python, "-u", "-m", "jupyter_llm.launcher.node", "run", node.run_dir,
            "--node-rank", str(node.index), "--attempt", str(attempt), "--slots", str(node.slots),
            "--master-addr", master_addr, "--master-port", str(master_port)]  # fmt: skip
    if cpu:
        argv.append("--cpu")
    if cluster.shared_fs:
        argv.append("--data-ready")
    elif data is not None:
        argv += ["--data", data]
    if pretrained is not None:
        argv += ["--pretrained", pretrained]
    return ssh_argv(cluster, node.host, argv)


def agent_hello(cluster: Cluster) -> bytes:
    """The first line the agent reads on stdin: the ranks' variables. They travel inside the
    ssh channel, never on a command line (where `ps` on the node would show them)."""
    return json.dumps({"env": cluster.env}).encode() + b"\n"


def hostfile(nodes: list[Node]) -> str:
    """The nodes and their ranks (slots), in order, in DeepSpeed's hostfile format; each node's
    agent reads its first rank and the world size from it (the names are only keys)."""
    return "".join(f"node{n.index} slots={n.slots}\n" for n in nodes)


def plan_nodes(cluster: Cluster, run_id: str, local_run_dir: Path, slots_default: int) -> list[Node]:
    out = []
    for i, h in enumerate(cluster.hosts):
        run_dir = str(local_run_dir) if cluster.shared_fs else _join(cluster.workdir_of(h), run_id)
        out.append(Node(i, h, run_dir, h.slots or slots_default))
    return out


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def master_addr(cluster: Cluster) -> str:
    return cluster.master_addr or cluster.hosts[0].host


def pdsh_command(
    cluster: Cluster, nodes: list[Node], run_dir: Path, port: int, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """DeepSpeed's own pdsh mode (shared filesystem): one runner here, pdsh to every node.
    The ranks' variables travel in the file DS_ENV_FILE names (written by the caller)."""
    if len({n.host.port for n in nodes}) > 1:
        raise ValueError("pdsh uses one ssh port for every host; give all hosts the same port")
    argv = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(run_dir / "hostfile.pdsh"),
            "--launcher", "pdsh", "--master_addr", master_addr(cluster), "--master_port", str(port),
            "--no_ssh_check", "--no_local_rank", "--module", "jupyter_llm.train", str(run_dir)]  # fmt: skip
    env = {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": shlex.join(ssh_options(cluster, nodes[0].host)),
           "DS_ENV_FILE": str(run_dir / "ds_env")}  # fmt: skip
    return argv, env


def pdsh_hostfile(nodes: list[Node]) -> str:
    return "".join(f"{n.host.host} slots={n.slots}\n" for n in nodes)


# -- the agent's records read back, one command run ---------------------------------------


def parse_node_log(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The agent's STARTED and RESULT records from a node's log (the ssh output)."""
    started = result = None
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(STARTED + " "):
                started = json.loads(line.split(" ", 1)[1])
            elif line.startswith(RESULT + " "):
                result = json.loads(line.split(" ", 1)[1])
    return started, result


def run_quiet(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run `argv` without stdin: its exit status (124: timed out) and the tail of its stderr
    (its stdout when stderr is empty)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s"
    return out.returncode, (out.stderr or out.stdout).strip()[-2000:]


__all__ = ["Node", "agent_argv", "agent_hello", "hostfile", "master_addr", "parse_node_log", "pdsh_command",
           "pdsh_hostfile", "plan_nodes", "probe_argv", "rsync_argv", "run_quiet", "ssh_argv", "ssh_options"]  # fmt: skip
