"""The Slurm backend: an sbatch script built from the spec, and the commands around it.

One task per node (`srun --ntasks-per-node=1`), each running DeepSpeed's launcher in
`--no_ssh --node_rank $SLURM_NODEID` mode; the master is the allocation's first host.
Slurm needs a shared filesystem: the run folder is the same path on every node.
"""

from __future__ import annotations

import shlex
import subprocess
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..cluster import Cluster

if TYPE_CHECKING:
    from ..spec import Spec
    from .remote import Node

CTL_TIMEOUT_S = 30.0  # sbatch, squeue, scontrol, sacct, scancel: a hung controller must not hang us
UNREACHABLE = "UNREACHABLE"  # job_state() when squeue did not answer in time: ask again later
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}


def port_for(run_id: str) -> int:
    """A master port chosen from the run id (Slurm picks the nodes later, so nothing can be
    probed now): stable for a run, spread over 20000-29999 across runs."""
    return 20000 + zlib.crc32(run_id.encode()) % 10000


def plan(spec: Spec, cluster: Cluster, run_dir: Path) -> list[Node]:
    """The nodes Slurm is asked for: `slurm.nodes` (else one per listed host, else 1), each
    with `procs_per_node` ranks (for "auto": `slurm.gpus_per_node`, else 1)."""
    from ..cluster import Host
    from .remote import Node

    count = cluster.slurm.nodes or len(cluster.hosts) or 1
    pp = spec.distributed.procs_per_node
    slots = pp if isinstance(pp, int) else (cluster.slurm.gpus_per_node or 1)
    return [Node(i, Host(host=f"node{i}"), str(run_dir), slots) for i in range(count)]


def sbatch_script(
    spec: Spec, cluster: Cluster, run_dir: Path, nodes: list[Node], port: int, attempt: int
) -> str:
    s = cluster.slurm
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote('jllm-' + run_dir.name)}",
        f"#SBATCH --nodes={len(nodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={shlex.quote(str(run_dir / 'logs' / 'slurm-%j.log'))}",
        f"#SBATCH --chdir={shlex.quote(str(run_dir))}",
        "#SBATCH --open-mode=append",  # a requeued job's output follows the first's
        # preemption and time limits: Slurm may requeue the job, and warns the batch shell with
        # USR1 this long before the time limit (the ranks checkpoint, the job requeues itself)
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{max(60, int(spec.train.stop_grace_s))}",
    ]
    gpus = s.gpus_per_node  # asked for only when given: procs_per_node may count CPU ranks
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for key, value in (("partition", s.partition), ("account", s.account), ("time", s.time),
                       ("cpus-per-task", s.cpus_per_task)):  # fmt: skip
        if value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {opt}" for opt in s.extra]
    lines += ["set -euo pipefail"]
    if cluster.activate:
        lines.append(cluster.activate)
    env = {
        "PYTHONUNBUFFERED": "1",
        "JUPYTER_LLM_RUN_DIR": str(run_dir),
        "JUPYTER_LLM_DATA_READY": "1",
        **cluster.env,
    }
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    # a requeued job is the run's next attempt (the supervisor counts the same way)
    lines += [f"export JUPYTER_LLM_ATTEMPT=$(( {attempt} + ${{SLURM_RESTART_COUNT:-0}} ))",
              f'export JUPYTER_LLM_JOB={shlex.quote(run_dir.name)}:"$JUPYTER_LLM_ATTEMPT"']  # fmt: skip
    stop = shlex.quote(str(run_dir / "control" / "stop"))
    lines += [
        f"STOP={stop}",
        f'if grep -qs {PREEMPTED!r} "$STOP"; then rm -f "$STOP"; fi  # that stop was the last attempt\'s',
        "preempted=0",
        # USR1: checkpoint and exit (the ranks' stop request), then requeue this job
        f"""trap 'preempted=1; printf "{{\\"reason\\": \\"{PREEMPTED}\\"}}\\n" > "$STOP"' USR1""",
    ]
    if cluster.python.startswith("/"):  # its folder first, as for local ranks (its ninja built the ops)
        lines.append(f'export PATH={shlex.quote(cluster.python.rsplit("/", 1)[0])}:"$PATH"')
    if cluster.master_addr:
        lines.append(f"export MASTER_ADDR={shlex.quote(cluster.master_addr)}")
    else:
        lines.append('export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"')
    # each node's ranks through launcher.ranks (no DeepSpeed import in front of them), this
    # node's first rank from SLURM_NODEID; CUDA_VISIBLE_DEVICES stays as Slurm set it
    slots, count = nodes[0].slots, len(nodes)
    fixed = [cluster.python, "-u", "-m", "jupyter_llm.launcher.ranks", f"--ranks={slots}",
             f"--world-size={slots * count}", f"--nodes={count}", f"--master-port={port}"]  # fmt: skip
    inner = (f'exec {shlex.join(fixed)} --first-rank="$(( SLURM_NODEID * {slots} ))" --node-rank="$SLURM_NODEID"'
             f' --master-addr="$MASTER_ADDR" {shlex.join(["jupyter_llm.train", str(run_dir)])}')  # fmt: skip
    lines += [
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(inner)} &",
        "job=$!",
        "set +e",
        'while true; do wait "$job"; rc=$?; kill -0 "$job" 2>/dev/null || break; done  # a trap ends a wait',
        'if [ "$preempted" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


PREEMPTED = "preempted"  # the reason a preempted job's stop request gives (control/stop)


def restarts(job_id: str) -> int | None:
    """How often Slurm requeued the job (scontrol's Restarts=), or None when unknown."""
    value = _job_fields(job_id).get("Restarts", "")
    return int(value) if value.isdigit() else None


def _job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o`'s KEY=VALUE fields; empty when the controller does not answer
    in time or no longer remembers the job (MinJobAge)."""
    try:
        out = ctl(show_argv(job_id))
    except SlurmTimeout:
        return {}
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f) if out.returncode == 0 else {}


def submit_argv(script: Path) -> list[str]:
    return ["sbatch", "--parsable", str(script)]


def parse_job_id(out: str) -> str:
    """`sbatch --parsable` prints `JOBID` or `JOBID;CLUSTER`."""
    job = out.strip().splitlines()[-1].split(";")[0].strip()
    if not job.isdigit():
        raise ValueError(f"sbatch printed no job id: {out!r}")
    return job


def state_argv(job_id: str) -> list[str]:
    return ["squeue", "-h", "-j", job_id, "-o", "%T"]


def cancel_argv(job_id: str) -> list[str]:
    return ["scancel", job_id]


def accounting_argv(job_id: str) -> list[str]:
    return ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"]


class SlurmTimeout(RuntimeError):
    """A Slurm command did not answer within CTL_TIMEOUT_S."""


def ctl(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run one Slurm client command with a timeout (CTL_TIMEOUT_S); SlurmTimeout names it and
    what to check."""
    timeout = timeout or CTL_TIMEOUT_S
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmTimeout(
            f"{argv[0]} did not answer within {timeout:g} s: is the Slurm controller reachable (`scontrol ping`)?"
        ) from None


def job_state(job_id: str) -> str | None:
    """The job's state while squeue lists it; None once it left the queue; UNREACHABLE when
    squeue did not answer in time."""
    try:
        out = ctl(state_argv(job_id))
    except SlurmTimeout:
        return UNREACHABLE
    state = out.stdout.strip().split("\n")[0].strip() if out.returncode == 0 else ""
    return state or None


def show_argv(job_id: str) -> list[str]:
    return ["scontrol", "show", "job", "-o", job_id]


def final_state(job_id: str) -> tuple[str | None, int]:
    """(State, exit code), e.g. ("COMPLETED", 0) or ("FAILED", 1): from the controller while
    it remembers the job (MinJobAge), else from accounting."""
    fields = _job_fields(job_id)
    if "JobState" in fields:
        code = fields.get("ExitCode", "1:0").split(":")[0]
        return fields["JobState"], int(code) if code.isdigit() else 1
    try:
        out = ctl(accounting_argv(job_id))
    except SlurmTimeout:
        return None, 1
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2:
            code = parts[1].split(":")[0]
            return parts[0].split()[0], int(code) if code.isdigit() else 1
    return None, 1
