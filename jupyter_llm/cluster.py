"""Clusters: where a run's ranks go when they do not run on this machine.

Described once in `$JUPYTER_LLM_HOME/clusters.yaml` (or `~/.jupyter-llm/clusters.yaml`)::

    gpu-box:                      # a name for `distributed.nodes: gpu-box`
      hosts: [trainer@10.0.0.5]   # ssh alias, host, host:port or user@host:port
      python: /opt/venv/bin/python
    pair:
      hosts:
        - {host: 127.0.0.2, port: 2222, slots: 1, workdir: /scratch/a}
        - {host: 127.0.0.3, port: 2222, slots: 1}
      workdir: /scratch/llm-runs  # remote run folders live here (one per run)
      ssh: {identity: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts}
      env: {NCCL_SOCKET_IFNAME: eth0}

or inline in the spec (`distributed.nodes: {hosts: [...], ...}`), or as a plain list of hosts
(`distributed.nodes: [a, b]`, every other setting at its default). Parsing only: what a node
really has is asked by the pre-flight (`jupyter_llm.launcher.probe.preflight`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .inputs import load_yaml, read_text

CLUSTER_FILE = "cluster.json"  # in a run folder: the cluster it runs on (absent: this machine)
HOST_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>\d{1,5}))?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Host(_Model):
    host: str  # an address or an ssh alias: never an option (no leading '-')
    port: int | None = Field(None, ge=1, le=65535)
    user: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$")
    slots: int | None = Field(None, ge=1, le=1024)  # ranks on this node; None: its GPUs (1 on CPU)
    workdir: str | None = None  # overrides the cluster's

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r} is not a host name, address or ssh alias")
        return v

    @classmethod
    def parse(cls, text: str) -> Host:
        m = HOST_RE.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a host (host, host:port or user@host:port)")
        return cls(host=m["host"], user=m["user"], port=int(m["port"]) if m["port"] else None)

    @property
    def label(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


class SshOptions(_Model):
    identity: str | None = None  # private key (IdentitiesOnly)
    known_hosts: str | None = None  # host keys are always checked strictly against this file
    config: str | None = None  # an ssh_config file (-F)
    connect_timeout: int = Field(5, ge=1, le=300)
    options: dict[str, str] = {}  # more `-o Key=Value`; BatchMode and host key checking stay on

    @field_validator("options")
    @classmethod
    def _no_weakening(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.lower() in ("batchmode", "stricthostkeychecking", "userknownhostsfile", "proxycommand"):
                raise ValueError(f"{key} is set by jupyter-llm (or unsafe here) and cannot be overridden")
            if not re.fullmatch(r"[A-Za-z]+", key):
                raise ValueError(f"{key!r} is not an ssh option name")
        return v


class SlurmOptions(_Model):
    nodes: int | None = Field(None, ge=1, le=100000)  # None: as many as hosts are listed (else 1)
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # e.g. "02:00:00"
    gpus_per_node: int | None = Field(None, ge=0)  # --gpus-per-node (None: none asked for)
    cpus_per_task: int | None = Field(None, ge=1)
    extra: list[str] = []  # more `#SBATCH` options, e.g. "--qos=high"

    @field_validator("partition", "account", "time")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._:,+-]+", v):
            raise ValueError(f"{v!r} has characters a Slurm value does not")
        return v

    @field_validator("extra")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("--") or "\n" in opt:
                raise ValueError(f"{opt!r} is not one `--option[=value]` line")
        return v


class Cluster(_Model):
    name: str = "inline"
    hosts: list[Host] = []  # at least one, except for Slurm (it allocates the nodes)
    launcher: Literal["ssh", "pdsh", "slurm"] = "ssh"  # ssh: our supervisor starts one launcher per node
    workdir: str = "~/jupyter-llm-runs"  # remote folder of run folders ("~" is the node's home)
    python: str = "python3"  # the node's interpreter, with jupyter-llm, torch and deepspeed
    activate: str | None = None  # a shell line run first on a node, e.g. "source /venv/bin/activate"
    shared_fs: bool = False  # True: the nodes see this machine's runs root at the same path
    master_addr: str | None = None  # the address ranks reach node 0 at; None: its host
    env: dict[str, str] = {}  # variables for the ranks on every node
    ssh: SshOptions = SshOptions()
    slurm: SlurmOptions = SlurmOptions()
    sync_every_s: float = Field(2.0, gt=0, le=3600)  # how often metrics come back (no shared fs)

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            return [Host.parse(h) if isinstance(h, str) else h for h in v]
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return {k: str(x) for k, x in v.items()}

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        if not v or v.startswith("-") or "\n" in v:
            raise ValueError(f"{v!r} is not an interpreter path")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Cluster:
        if not self.hosts and self.launcher != "slurm":
            raise ValueError("hosts: give at least one host")
        labels = [h.label for h in self.hosts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a host is listed twice: {labels}")
        if self.launcher in ("pdsh", "slurm") and not self.shared_fs:
            raise ValueError(
                f"launcher {self.launcher!r} needs shared_fs: true (the nodes must see the run folder)"
            )
        return self

    def workdir_of(self, host: Host) -> str:
        return host.workdir or self.workdir

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def clusters_file() -> Path:
    home = os.environ.get("JUPYTER_LLM_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".jupyter-llm") / "clusters.yaml"


def load_clusters(path: str | os.PathLike[str] | None = None) -> dict[str, Cluster]:
    """Every cluster of the clusters file (none when it does not exist)."""
    f = Path(path) if path is not None else clusters_file()
    if not f.is_file():
        return {}
    raw = load_yaml(read_text(f), str(f)) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{f}: expected a mapping of cluster names to clusters")
    out = {}
    for name, body in raw.items():
        out[str(name)] = _cluster({**(body or {}), "name": str(name)}, f"{f}: cluster {name!r}")
    return out


def resolve(nodes: Any, path: str | os.PathLike[str] | None = None) -> Cluster | None:
    """The cluster `distributed.nodes` names: None for this machine (1), a cluster by name,
    an ad-hoc one from a list of hosts, or an inline mapping."""
    if nodes in (1, None):
        return None
    if isinstance(nodes, str):
        clusters = load_clusters(path)
        if nodes in clusters:
            return clusters[nodes]
        known = ", ".join(sorted(clusters)) or "none"
        raise UserError(
            f"distributed.nodes: no cluster named {nodes!r} in {path or clusters_file()} (known: {known}); "
            "describe it there, or give a list of hosts"
        )
    if isinstance(nodes, list):
        return _cluster({"name": "hosts", "hosts": nodes}, "distributed.nodes")
    if isinstance(nodes, dict):
        return _cluster({"name": "inline", **nodes}, "distributed.nodes")
    raise UserError(f"distributed.nodes: {nodes!r} is not 1, a cluster name, a list of hosts or a cluster")


def _cluster(body: dict[str, Any], where: str) -> Cluster:
    try:
        return Cluster.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'cluster'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise UserError(f"{where}: {problems}") from None


def write_cluster(run_dir: Path, cluster: Cluster) -> None:
    """Record in a run folder the cluster it runs on (also for its resumes)."""
    from .files import write_json_atomic

    write_json_atomic(run_dir / CLUSTER_FILE, cluster.to_dict())


def run_cluster(run_dir: Path) -> Cluster | None:
    """The cluster a run folder records, or None for a run on this machine."""
    from .files import read_json

    raw = read_json(run_dir / CLUSTER_FILE)
    return Cluster.model_validate(raw) if raw else None
