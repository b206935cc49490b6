"""One interface over the launch backends: a pure builder per backend,
`(spec, cluster, run folder, master port, nodes) -> the exact commands`, chosen by the spec
(`distributed.nodes` → no cluster: local; else the cluster's `launcher`). Nothing is started
here: the runners (`runners.RUNNERS`, under the same names) run these commands, and the dry run
shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..cluster import Cluster, Host
from . import remote, slurm
from .local import build_command

if TYPE_CHECKING:
    from ..spec import Spec


@dataclass(frozen=True)
class Command:
    where: str  # "this machine", "node 1 (host:port)", "sbatch"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the caller's environment
    script: str | None = None  # a file the command needs (the sbatch script)


class Builder(Protocol):
    def __call__(
        self, spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
        attempt: int, cpu: bool,
    ) -> list[Command]: ...  # fmt: skip


def local_node(run_dir: Path, ranks: int) -> remote.Node:
    return remote.Node(0, Host(host="localhost"), str(run_dir), ranks)


def _local(spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
           attempt: int, cpu: bool) -> list[Command]:  # fmt: skip
    argv, env = build_command(run_dir, nodes[0].slots, port, attempt=attempt, cpu=cpu)
    return [Command("this machine", argv, env)]


def _ssh(spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
         attempt: int, cpu: bool) -> list[Command]:  # fmt: skip
    assert cluster is not None
    pre = spec.model.pretrained is not None and Path(spec.model.pretrained).is_dir() and not cluster.shared_fs
    addr, data = remote.master_addr(cluster), None if cluster.shared_fs else "data"
    return [Command(n.label, remote.agent_argv(cluster, n, attempt=attempt, master_addr=addr, master_port=port,
                                               cpu=cpu, data=data, pretrained="pretrained" if pre else None))
            for n in nodes]  # fmt: skip


def _pdsh(spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
          attempt: int, cpu: bool) -> list[Command]:  # fmt: skip
    assert cluster is not None
    argv, env = remote.pdsh_command(cluster, nodes, run_dir, port)
    return [Command("this machine (pdsh to every node)", argv, env)]


def _slurm(spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
           attempt: int, cpu: bool) -> list[Command]:  # fmt: skip
    assert cluster is not None
    path = run_dir / f"job-{attempt}.sbatch"
    script = slurm.sbatch_script(spec, cluster, run_dir, nodes, port, attempt)
    return [Command("sbatch", slurm.submit_argv(path), script=script)]


BACKENDS: dict[str, Builder] = {"local": _local, "ssh": _ssh, "pdsh": _pdsh, "slurm": _slurm}


def backend_name(cluster: Cluster | None) -> str:
    return "local" if cluster is None else cluster.launcher


def commands(
    spec: Spec, cluster: Cluster | None, run_dir: Path, port: int, nodes: list[remote.Node], *,
    attempt: int = 1, cpu: bool = True,
) -> list[Command]:  # fmt: skip
    """The commands a launch of `spec` runs, in order, for the backend the spec chooses."""
    return BACKENDS[backend_name(cluster)](spec, cluster, run_dir, port, nodes, attempt=attempt, cpu=cpu)
