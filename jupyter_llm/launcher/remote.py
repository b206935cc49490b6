"""Remote and multi-node launch over ssh: pure command builders, the pre-flight, the sync.

Every command is an argument list; what runs on a node is one `shlex.join`ed command line
(ssh hands the remote shell a string), so names and paths arrive verbatim. The spec travels
as a file in the synced run folder, never on a command line. Host keys are always checked
strictly (`BatchMode`, `StrictHostKeyChecking yes`): an unknown or changed key fails closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cluster import Cluster, Host
from ..files import append_jsonl
from ..folder import EVENTS_FILE, FINAL_DIR
from .node import DISTS, RESULT, STARTED, versions

# run-folder entries the nodes need (pushed); the rest is written by the job or the supervisor
PUSH_EXCLUDE = ["/logs/", "/control/", "/nodes/", "/evals/", "/final/", "/.final.tmp/", "/status.json",
                "/events.jsonl", "/metrics.jsonl", "/grads.jsonl", "/progress.json", "/data.json",
                "/manifest.json", "/failures/", "/ranks/", "/export_check.pt"]  # fmt: skip
# what comes back from a node into its staging folder (nodes/nodeK/ of the local run)
PULL_INCLUDE = ["/metrics.jsonl", "/grads.jsonl", "/events.jsonl", "/export_check.pt", "/logs/",
                "/logs/rank*.log", "/ranks/***", "/failures/***", "/checkpoints/***", "/final/***"]  # fmt: skip


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
    """DeepSpeed's hostfile; names are only keys for its world info (each agent is its node)."""
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


# -- pre-flight ---------------------------------------------------------------------------


@dataclass
class NodeFacts:
    node: Node
    ok: bool
    problem: str | None
    facts: dict[str, Any]


def explain_ssh_failure(node: Node, cluster: Cluster, rc: int, stderr: str) -> str:
    """A node's ssh failure as a message that says what to do."""
    err = stderr.strip()
    kh = cluster.ssh.known_hosts or "~/.ssh/known_hosts"
    port = f"-p {node.host.port} " if node.host.port else ""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
        return (f"{node.label}: its host key CHANGED since it was recorded in {kh}; refusing to connect. "
                "If the node was reinstalled, check the new key's fingerprint and replace the line")  # fmt: skip
    if (
        "Host key verification failed" in err
        or "No ED25519 host key is known" in err
        or "host key for" in err
    ):
        return (f"{node.label}: host key unknown (not in {kh}; host keys are checked strictly). Check the "
                f"node's fingerprint, then add it: ssh-keyscan {port}{node.host.host} >> {kh}")  # fmt: skip
    if "Permission denied" in err:
        return (f"{node.label}: ssh login refused (no password prompts in batch mode): set ssh.identity to "
                "a key the node accepts")  # fmt: skip
    if any(k in err for k in ("Connection refused", "timed out", "No route to host", "Could not resolve",
                              "Network is unreachable", "Connection closed", "Name or service not known")):  # fmt: skip
        return f"{node.label}: unreachable ({_last(err)}); check the host, the port and that sshd runs there"
    if rc == 255:
        return f"{node.label}: ssh failed: {_last(err) or 'exit 255'}"
    if "No module named" in err:
        return (f"{node.label}: {cluster.python} has no jupyter-llm ({_last(err)}); install it there or set "
                "python/activate in the cluster")  # fmt: skip
    if rc == 127 or "not found" in err:
        return f"{node.label}: {cluster.python} not found on the node ({_last(err)}); set python/activate"
    return f"{node.label}: the probe failed (exit {rc}): {_last(err)}"


def _last(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    return lines[-1].strip() if lines else ""


def probe_nodes(
    cluster: Cluster, nodes: list[Node], port: int | None, expect: str | None, timeout: float = 60,
    nvme: str | None = None,
) -> list[NodeFacts]:  # fmt: skip
    """Ask every node at once; node 0 also checks the master port on the master address."""
    addr = master_addr(cluster)

    def one(node: Node) -> NodeFacts:
        argv = probe_argv(cluster, node, addr if node.index == 0 else None, port, expect, nvme)
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return NodeFacts(node, False, f"{node.label}: no answer within {timeout:g} s", {})
        except OSError as e:
            return NodeFacts(node, False, f"ssh could not be started: {e}", {})
        if out.returncode != 0:
            return NodeFacts(node, False, explain_ssh_failure(node, cluster, out.returncode, out.stderr), {})
        try:
            facts = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return NodeFacts(node, False, f"{node.label}: unreadable probe answer: {out.stdout[-200:]!r}", {})
        return NodeFacts(node, True, None, facts)

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        return list(pool.map(one, nodes))


@dataclass
class Preflight:
    checks: list[tuple[str, bool, str]]  # (name, ok, detail)
    nodes: list[Node]  # with run folders resolved to absolute node paths
    master_port: int | None
    cpu: bool
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # node label -> fit.Resources dict

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    @property
    def problems(self) -> list[str]:
        return [detail for _, ok, detail in self.checks if not ok]


def preflight(
    cluster: Cluster, nodes: list[Node], want_port: int | None, sync_bytes: int = 0, expect: str | None = None,
    nvme: str | None = None, nvme_required: bool = True,
) -> Preflight:  # fmt: skip
    """Every node reachable non-interactively with a known host key, the same versions as
    here, its ranks available, a free master port on node 0, free disk in the work folder;
    with `nvme`, that folder on every node (exists, writable, not a tmpfs): a failed check
    unless `nvme_required` is false (offload: auto, where an unusable folder only rules NVMe
    out). Each node's resources (memory, GPUs, NVMe space) come back for the fit."""
    answers = probe_nodes(cluster, nodes, want_port, expect, nvme=nvme)
    checks: list[tuple[str, bool, str]] = []
    here = versions()
    resolved, port, cpu = [], want_port, True
    resources: dict[str, dict[str, Any]] = {}
    for a in answers:
        n = a.node
        if not a.ok:
            checks.append((f"{n.label} reachable", False, a.problem or "?"))
            resolved.append(n)
            continue
        f = a.facts
        checks.append((f"{n.label} reachable", True, f"ssh ok ({f['hostname']}, {f['python']})"))
        if "resources" in f:
            resources[n.label] = f["resources"]
            if nvme is not None:
                problem, free = f["resources"].get("nvme_problem"), f["resources"].get("nvme_free") or 0
                checks.append((f"{n.label} nvme", problem is None or not nvme_required,
                               f"{n.label}: {problem}" if problem else f"{nvme}: {free / 2**30:.1f} GiB free"))  # fmt: skip
        theirs = f["versions"]
        diff = [
            f"{k} {theirs.get(k)} here {here.get(k)}"
            for k in ("python", *DISTS)
            if theirs.get(k) != here.get(k)
        ]
        checks.append((f"{n.label} versions", not diff,
                       ("; ".join(diff) and f"{n.label}: versions differ: " + "; ".join(diff)) or "same as here"))  # fmt: skip
        # procs_per_node "auto" (slots 0): the node's GPUs, or 1 CPU rank
        want = n.slots or f["gpus"] or 1
        if f["gpus"]:
            cpu = False
            ok = want <= f["gpus"]
            checks.append((f"{n.label} ranks", ok, f"{want} rank(s) on {f['gpus']} GPU(s)" if ok else
                           f"{n.label}: {want} rank(s) but the node has {f['gpus']} GPU(s)"))  # fmt: skip
        else:
            checks.append((f"{n.label} ranks", True, f"{want} CPU rank(s) on {f['cpus']} core(s)"))
        need = sync_bytes + (256 << 20)
        ok = bool(f["writable"]) and f["disk_free"] >= need
        checks.append((f"{n.label} disk", ok, f"{f['disk_free'] / 2**30:.1f} GiB free in {f['workdir']}" if ok else
                       f"{n.label}: {f['workdir']} is not writable or has under {need / 2**30:.2f} GiB free"))  # fmt: skip
        if not cluster.shared_fs and not f["rsync"]:
            checks.append(
                (f"{n.label} rsync", False, f"{n.label}: rsync is not installed (needed without shared_fs)")
            )
        if expect is not None and not f.get("expect_exists"):
            checks.append((f"{n.label} shared folder", False,
                           f"{n.label}: does not see {expect}; the cluster says shared_fs: true"))  # fmt: skip
        resolved.append(Node(n.index, n.host, f["workdir"] if not cluster.shared_fs else n.run_dir, want))
        if n.index == 0 and "port_free" in f:
            addr = master_addr(cluster)
            if want_port is not None:
                checks.append(("master port", bool(f["port_free"]), f"{want_port} free on {addr}" if f["port_free"]
                               else f"master port {want_port} is in use on {addr} ({n.label}); "
                               "free it, or remove distributed.master_port to pick a free one"))  # fmt: skip
            else:
                port = f.get("free_port")
                checks.append(("master port", port is not None, f"{port} (free on {addr})" if port else
                               f"cannot bind on {addr} on {n.label}: set master_addr to the node's address"))  # fmt: skip
    return Preflight(checks, resolved, port, cpu, resources)


# -- the sync (no shared filesystem) ------------------------------------------------------


def run_quiet(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s"
    return out.returncode, (out.stderr or out.stdout).strip()[-2000:]


class Syncer:
    """Brings the job's files back from the nodes into the local run folder.

    Each node's files land in a staging folder (`nodes/nodeK/`) first; from there the
    append-only files of rank 0's node (metrics, gradients, its events) are appended to
    the local ones, rank logs and records are copied, and a checkpoint is assembled from
    every node's part once node 0 has marked it complete (node 0 is pulled before the
    others, so the parts of a marked checkpoint are whole by then)."""

    def __init__(
        self, cluster: Cluster, nodes: list[Node], run_dir: Path, marker: str, control: str | None = None
    ):
        self.cluster, self.nodes, self.dir, self.marker = cluster, nodes, run_dir, marker
        self.control = control
        self.events_off: int | None = None
        self.errors: list[str] = []

    def stage(self, node: Node) -> Path:
        return self.dir / "nodes" / f"node{node.index}"

    def pull(self, node: Node) -> bool:
        filt = [f"--include={p}" for p in PULL_INCLUDE] + ["--exclude=*", "--delete", "--prune-empty-dirs"]
        argv = rsync_argv(self.cluster, node.host, node.run_dir + "/", str(self.stage(node)) + "/", push=False,
                          extra=filt, control=self.control)  # fmt: skip
        rc, err = run_quiet(argv, timeout=300)
        if rc not in (0, 23, 24):  # 23/24: some files vanished meanwhile (a pruned checkpoint)
            self.errors.append(f"{node.label}: {err}")
            return False
        return True

    def start(self) -> None:
        """Before the job starts: where the node's events file ends now."""
        self.pull(self.nodes[0])
        self.events_off = _size(self.stage(self.nodes[0]) / EVENTS_FILE)

    def cycle(self, final: bool = False) -> None:
        for node in self.nodes:  # node 0 first: its checkpoint markers before the others' parts
            self.pull(node)
        s0 = self.stage(self.nodes[0])
        for name in ("metrics.jsonl", "grads.jsonl"):
            _append_new(s0 / name, self.dir / name)
        self._events(s0 / EVENTS_FILE)
        for node in self.nodes:
            st = self.stage(node)
            for sub, pattern in (("logs", "rank*.log"), ("ranks", "rank*.json"), ("failures", "rank*.json")):
                for f in st.glob(f"{sub}/{pattern}"):
                    _copy_if_changed(f, self.dir / sub / f.name)
        self._checkpoints()
        if final:
            if (s0 / FINAL_DIR).is_dir():
                _replace_tree(s0 / "final", self.dir / FINAL_DIR)
            if (s0 / "export_check.pt").is_file():
                _copy_if_changed(s0 / "export_check.pt", self.dir / "export_check.pt")

    def _events(self, staged: Path) -> None:
        if self.events_off is None or not staged.is_file():
            return
        with open(staged, "rb") as f:
            f.seek(self.events_off)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                append_jsonl(self.dir / EVENTS_FILE, json.loads(line))
        self.events_off += end

    def _checkpoints(self) -> None:
        s0 = self.stage(self.nodes[0]) / "checkpoints"
        marked = {p.parent.name for p in s0.glob(f"*/{self.marker}")}
        local = self.dir / "checkpoints"
        local.mkdir(exist_ok=True)
        for tag in sorted(marked):
            if (local / tag / self.marker).is_file():
                continue
            tmp = local / f".{tag}.assembling"
            shutil.rmtree(tmp, ignore_errors=True)
            for node in self.nodes:
                src = self.stage(node) / "checkpoints" / tag
                if src.is_dir():
                    shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
            shutil.rmtree(local / tag, ignore_errors=True)
            os.replace(tmp, local / tag)
        if (s0).is_dir():  # pruned on node 0: prune here too
            for p in local.iterdir():
                if (
                    p.is_dir()
                    and not p.name.startswith(".")
                    and p.name not in marked
                    and (p / self.marker).is_file()
                ):
                    shutil.rmtree(p, ignore_errors=True)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _append_new(src: Path, dst: Path) -> None:
    """Append the complete lines `src` has beyond `dst`'s length (the local copy of an
    append-only file the node writes)."""
    have = _size(dst)
    if _size(src) <= have:
        return
    with open(src, "rb") as f:
        f.seek(have)
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end:
        with open(dst, "ab") as out:
            out.write(data[:end])


def _copy_if_changed(src: Path, dst: Path) -> None:
    with contextlib.suppress(OSError):
        s = src.stat()
        with contextlib.suppress(OSError):
            d = dst.stat()
            if d.st_size == s.st_size and d.st_mtime >= s.st_mtime:
                return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.sync")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.sync")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def push(cluster: Cluster, nodes: list[Node], run_dir: Path, data_dir: Path | None, pretrained: str | None,
         log: Callable[[str], None], control: str | None = None) -> list[str]:  # fmt: skip
    """Copy the run folder (spec, tokenizer, hostfile, checkpoints), the prepared data and a
    pretrained model's folder to every node at once; returns the problems."""

    def one(node: Node) -> list[str]:
        t0 = time.monotonic()
        pairs = [(str(run_dir) + "/", node.run_dir + "/", [f"--exclude={p}" for p in PUSH_EXCLUDE])]
        if data_dir is not None:
            pairs.append((str(data_dir) + "/", node.run_dir + "/data/", []))
        if pretrained is not None:
            pairs.append((pretrained.rstrip("/") + "/", node.run_dir + "/pretrained/", []))
        for src, dst, extra in pairs:
            rc, err = run_quiet(
                rsync_argv(cluster, node.host, src, dst, push=True, extra=extra, control=control)
            )
            if rc != 0:
                return [f"{node.label}: copying the run folder failed (rsync exit {rc}): {err}"]
        log(f"{node.label}: synced in {time.monotonic() - t0:.1f} s")
        return []

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        return [e for errs in pool.map(one, nodes) for e in errs]


def close_shared(cluster: Cluster, nodes: list[Node], control: str) -> None:
    """End the shared connections (`ssh -O exit`) and remove their folder. None were opened
    when nothing was copied (a shared filesystem, Slurm): no ssh call then."""
    for n in nodes if any(Path(control).iterdir()) else []:
        argv = ["ssh", *ssh_options(cluster, n.host, control), "-O", "exit", "--", n.host.host]
        run_quiet(argv, timeout=10)
    shutil.rmtree(control, ignore_errors=True)


def tree_bytes(*paths: Path | None) -> int:
    total = 0
    for p in paths:
        if p is None or not p.exists():
            continue
        for f in [p] if p.is_file() else p.rglob("*"):
            with contextlib.suppress(OSError):
                if f.is_file():
                    total += f.stat().st_size
    return total


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


__all__ = ["Node", "Preflight", "Syncer", "agent_argv", "hostfile", "plan_nodes", "preflight", "push", "rsync_argv",
           "ssh_argv"]  # fmt: skip
