"""The pre-flight of a cluster's nodes: every node asked at once over ssh (`node probe`),
its answer checked against here (reachable, versions, ranks, disk, master port, NVMe).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..cluster import Cluster
from .node import DISTS, versions
from .remote import Node, master_addr, probe_argv


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


__all__ = ["NodeFacts", "Preflight", "explain_ssh_failure", "preflight", "probe_nodes"]
