"""The runners of a run on a cluster: ssh (one agent per node), pdsh, Slurm.

Pre-flight, data preparation here, the push of the run folder (no shared filesystem),
the launch, the watch (fail fast: when one node fails, every other node's job is killed),
the pull of metrics/events/checkpoints while it runs and of the final model at the end.
The attempt (`attempt.Attempt`) owns every status transition and decision.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..cluster import Cluster
from ..files import now_iso, read_json
from ..folder import CKPT_MARKER, FAILURES_DIR, LOGS_DIR, Event, State
from . import probe, remote, slurm, sync, system
from .attempt import STOP, Attempt, stop_file
from .backends import commands
from .local import job_env, rank_env
from .watch import diagnose

SLURM_UNREACHABLE_S = 300.0  # squeue silent this long: the job is cancelled and the run fails
# a job that requeues itself (preempted) may show its batch script's end (FAILED) before Slurm
# has it pending again (seen once in ~20 runs): it is given this long to come back
SLURM_REQUEUE_SETTLE_S = 60.0
KILL_WAIT_S = 10.0  # after fail-fast KILL, before the ssh connections are cut
SSHD_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]  # sshd's default
PDSH_SAFE = re.compile(r"[\w@%+=:,./-]+")  # what DeepSpeed's pdsh runner leaves unquoted


class ClusterRunner:
    """What the cluster backends share: pre-flight of the nodes, the data prepared here once,
    one shared ssh connection per node for the copies."""

    def __init__(self, att: Attempt, cluster: Cluster | None):
        assert cluster is not None
        self.att, self.cluster = att, cluster
        self.dir = att.dir
        self.spec = att.run.spec

    def run(self) -> int:
        # one shared ssh connection per node for the copies (a short socket path: /tmp)
        self.control = tempfile.mkdtemp(prefix="jllm-ssh-", dir="/tmp")
        try:
            return self.launch()
        finally:
            sync.close_shared(self.cluster, remote.plan_nodes(self.cluster, self.att.run.id, self.dir, 1),
                                self.control)  # fmt: skip

    def launch(self) -> int:
        ready = self.ready_nodes()
        return ready if isinstance(ready, int) else self.on_nodes(*ready)

    def on_nodes(self, nodes: list[remote.Node], port: int, cpu: bool) -> int:
        """Start and watch the job on the nodes that passed pre-flight (the data is ready)."""
        raise NotImplementedError

    def ready_nodes(self) -> tuple[list[remote.Node], int, bool] | int:
        """Pre-flight every node, then prepare the data: (nodes, master port, CPU ranks), or the
        attempt's exit code when it ended here (pre-flight failed, data failed, stopped)."""
        att, c = self.att, self.cluster
        pp = self.spec.distributed.procs_per_node
        nodes = remote.plan_nodes(c, att.run.id, self.dir, pp if isinstance(pp, int) else 0)
        att.set_status(State.STARTING, phase="preflight")
        d = self.spec.distributed
        nvme = d.nvme_path if d.offload == "nvme" else None  # checked on every node
        sync_bytes = 0 if c.shared_fs else sync.tree_bytes(*self.inputs(), self.pretrained_dir())
        pf = probe.preflight(c, nodes, d.master_port, sync_bytes, expect=str(self.dir) if c.shared_fs else None,
                              nvme=nvme)  # fmt: skip
        att.event(
            Event.PREFLIGHT, ok=pf.ok, checks=[{"name": n, "ok": ok, "detail": d} for n, ok, d in pf.checks]
        )
        if not pf.ok:
            return att.fail("pre-flight failed: " + "; ".join(pf.problems))
        nodes = [remote.Node(n.index, n.host, n.run_dir, n.slots or 1) for n in pf.nodes]
        assert pf.master_port is not None
        if att.stop_signal is not None:
            return att.finish(State.STOPPED, 0, None)
        att.set_status(State.STARTING, phase="data")
        if err := self.prepare_data():
            return att.fail(err)
        (self.dir / "hostfile").write_text(remote.hostfile(nodes))
        return nodes, pf.master_port, pf.cpu

    def inputs(self) -> list[Path]:
        return [Path(f) for f in [*self.spec.data.train, *(self.spec.data.validation or [])]]

    def pretrained_dir(self) -> Path | None:
        pre = self.spec.model.pretrained
        return Path(pre) if pre and os.path.isdir(pre) else None

    def ended(self, rc: int) -> int:
        return self.att.conclude(rc, lambda: (f"the job failed (exit {rc}); see {LOGS_DIR}/", None))

    def prepare_data(self) -> str | None:
        """Tokenizer and packed data are made here, once, then travel to the nodes."""
        argv = [sys.executable, "-u", "-m", "jupyter_llm.train.prepare", str(self.dir)]
        env = job_env(self.dir, self.att.number)
        with open(self.dir / LOGS_DIR / "prepare.log", "ab") as log:
            rc = subprocess.run(argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT).returncode  # fmt: skip
        if rc == 0:
            return None
        failure = read_json(self.dir / FAILURES_DIR / "rank0.json")
        if failure and failure.get("attempt") == self.att.number:
            return f"data preparation failed: {failure['type']}: {failure['message']}"
        return f"data preparation exited with code {rc}; see {LOGS_DIR}/prepare.log"


class SshRunner(ClusterRunner):
    """One agent per node over ssh (`launcher.node`), the run folder pushed to nodes without a
    shared filesystem and its metrics, events and checkpoints pulled back while it runs."""

    def __init__(self, att: Attempt, cluster: Cluster | None):
        super().__init__(att, cluster)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.failed: tuple[int, int] | None = None  # (node, exit code) of the first node that failed

    def log(self, text: str) -> None:
        self.att.log(text)

    def on_nodes(self, nodes: list[remote.Node], port: int, cpu: bool) -> int:
        att, c = self.att, self.cluster
        syncer = None
        if not c.shared_fs:
            att.set_status(State.STARTING, phase="sync")
            data_dir = Path((read_json(self.dir / "data.json") or {})["path"])
            pre = self.pretrained_dir()
            problems = sync.push(
                c, nodes, self.dir, data_dir, str(pre) if pre else None, self.log, self.control
            )
            if problems:
                return att.fail("; ".join(problems))
            syncer = sync.Syncer(c, nodes, self.dir, CKPT_MARKER, self.control)
            syncer.start()
        if att.stop_signal is not None:  # stopped while the data was prepared or copied
            return att.finish(State.STOPPED, 0, None)
        return self._run(nodes, port, cpu, syncer)

    def _run(self, nodes: list[remote.Node], port: int, cpu: bool, syncer: sync.Syncer | None) -> int:
        att, c = self.att, self.cluster
        addr = remote.master_addr(c)
        env = job_env(self.dir, att.number)  # the tag lets a later attempt reap stale ssh clients
        cmds = commands(self.spec, c, self.dir, port, nodes, attempt=att.number, cpu=cpu)
        for n, cmd in zip(nodes, cmds, strict=True):
            argv = cmd.argv
            with open(self.dir / LOGS_DIR / f"node{n.index}.log", "ab") as log:
                log.write(f"\n== attempt {att.number} at {now_iso()}: {' '.join(argv)}\n".encode())
                log.flush()
                self.procs[n.index] = subprocess.Popen(
                    argv, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            with contextlib.suppress(OSError):  # a dead connection shows as its exit code below
                stdin = self.procs[n.index].stdin
                assert stdin is not None
                stdin.write(remote.agent_hello(c))
                stdin.flush()
        world = sum(n.slots for n in nodes)
        att.event(Event.LAUNCHED, attempt=att.number, ranks=world, master_port=port, master_addr=addr,
                  nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots, "run_dir": n.run_dir} for n in nodes])  # fmt: skip
        att.set_status(State.RUNNING, phase=None, world_size=world, master_port=port, master_addr=addr,
                       nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots} for n in nodes])  # fmt: skip
        failed_at = 0.0
        last_sync = time.monotonic()
        att.launched_at = time.time()
        logs = {n.index: self.dir / LOGS_DIR / f"node{n.index}.log" for n in nodes}
        offsets = {i: log.stat().st_size if log.exists() else 0 for i, log in logs.items()}
        for _ in att.polls(self._signal):  # the hang check sees the synced files go quiet
            for i in offsets:  # the agents' system samples, into system.jsonl
                offsets[i] = system.collect(logs[i], offsets[i], self.dir)
            rcs = {i: p.poll() for i, p in self.procs.items()}
            if self.failed is None and att.stop_requested_at is None:  # a stop's own exits are no failure
                bad = [(i, rc) for i, rc in rcs.items() if rc not in (None, 0)]
                if bad:
                    self.failed, failed_at = bad[0], time.monotonic()
                    att.event(Event.NODE_FAILED, node=self.failed[0], exit_code=self.failed[1])
                    self._send("signal KILL")  # fail fast: the other nodes' ranks would hang
            elif self.failed is not None and time.monotonic() - failed_at > KILL_WAIT_S:
                self._cut()
            if all(rc is not None for rc in rcs.values()):
                break
            if syncer is not None and time.monotonic() - last_sync >= c.sync_every_s:
                syncer.cycle()
                last_sync = time.monotonic()
        self._cut()
        if syncer is not None:
            syncer.cycle(final=True)
        codes = {i: p.returncode for i, p in self.procs.items()}
        for n in nodes:  # each node's agent removed its NVMe swap folder (offload: nvme)
            _, result = remote.parse_node_log(logs[n.index])
            if result and result.get("swap_removed"):
                att.event(Event.SWAP_REMOVED, path=result["swap_removed"], node=n.index)
        att.set_status(State(att.run.status()["state"]), nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots,
                                                       "exit_code": codes[n.index]} for n in nodes])  # fmt: skip
        if self.failed is not None:  # a node's ranks failed, or the node itself (ssh lost: exit 255)
            node, rc = nodes[self.failed[0]], self.failed[1]
            failure = self._failure(node) or {"cause": "launcher", "node": node.index, "exit_code": rc}
            return att.fail_or_restart(self._why(node, rc), rc, failure)
        return self.ended(max(codes.values()))

    def _signal(self, name: str) -> str | None:
        """The attempt's stop request and stop ladder, to every node's agent (none after a
        node failed: every agent was told to KILL already)."""
        if name == STOP:
            self._send("stop")
            return None
        if self.failed is not None:
            return None
        self._send(f"signal {name.removeprefix('SIG')}")
        return name

    def _why(self, node: remote.Node, rc: int) -> str:
        _, result = remote.parse_node_log(self.dir / LOGS_DIR / f"node{node.index}.log")
        if result and result.get("error"):
            what = result["error"]
        elif rc == 255:
            what = f"the ssh connection failed or was lost (exit 255); see logs/node{node.index}.log"
        else:
            what = f"exited with code {rc}; see logs/node{node.index}.log"
        return f"{node.label}: {what}; the job was stopped on every node"

    def _failure(self, node: remote.Node) -> dict[str, Any] | None:
        """The failed node's structured failure (its agent's diagnosis), with the node named."""
        _, result = remote.parse_node_log(self.dir / LOGS_DIR / f"node{node.index}.log")
        failure = (result or {}).get("failure")
        return {**failure, "node": node.index} if failure else None

    def _send(self, command: str) -> None:
        for p in self.procs.values():
            if p.poll() is None and p.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    p.stdin.write(command.encode() + b"\n")
                    p.stdin.flush()

    def _cut(self) -> None:
        """Close every agent's stdin (it kills its job on EOF), then end the ssh clients."""
        for p in self.procs.values():
            with contextlib.suppress(OSError, ValueError):
                if p.stdin is not None:
                    p.stdin.close()
        deadline = time.monotonic() + KILL_WAIT_S
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class PdshRunner(ClusterRunner):
    """DeepSpeed's own multi-node launcher (pdsh, shared filesystem); after the job or a stop
    the job's tagged processes are reaped on every node (pdsh leaves remote ranks behind)."""

    def on_nodes(self, nodes: list[remote.Node], port: int, cpu: bool) -> int:
        att, c = self.att, self.cluster
        (self.dir / "hostfile.pdsh").write_text(remote.pdsh_hostfile(nodes))
        cmd = commands(self.spec, c, self.dir, port, nodes, attempt=att.number, cpu=cpu)[0]
        argv, env = cmd.argv, {**job_env(self.dir, att.number), **cmd.env}
        base = rank_env(self.dir, att.number, nodes[0].slots, cpu=cpu, base_env={},
                        loopback=remote.master_addr(c).startswith("127."))  # fmt: skip
        keep = (
            "JUPYTER_LLM_JOB",
            "JUPYTER_LLM_ATTEMPT",
            "JUPYTER_LLM_RUN_DIR",
            "OMP_NUM_THREADS",
            "GLOO_SOCKET_IFNAME",
        )
        ranks = {**{k: base[k] for k in keep if k in base}, "JUPYTER_LLM_DATA_READY": "1",
                 # the interpreter's folder first, as for local ranks: its ninja built DeepSpeed's ops
                 "PATH": os.pathsep.join([os.path.dirname(sys.executable), *SSHD_PATH]), **c.env}  # fmt: skip
        # DeepSpeed's pdsh runner puts these into a shell line with its own (weak) quoting
        unsafe = [
            f"{k}={v}"
            for k, v in {**ranks, "run folder": str(self.dir)}.items()
            if not PDSH_SAFE.fullmatch(v)
        ]
        if unsafe:
            return att.fail(f"launcher pdsh cannot pass {unsafe[0]!r} safely (DeepSpeed's pdsh mode quotes "
                             "only lightly); use launcher: ssh for such values or paths")  # fmt: skip
        (self.dir / "ds_env").write_text("".join(f"{k}={v}\n" for k, v in ranks.items()))
        if att.stop_signal is not None:
            return att.finish(State.STOPPED, 0, None)
        pgid = att.spawn(argv, env)
        world = sum(n.slots for n in nodes)
        att.event(
            Event.LAUNCHED, attempt=att.number, ranks=world, master_port=port, command=argv, job_pgid=pgid
        )
        att.set_status(State.RUNNING, phase=None, job_pgid=pgid, world_size=world, master_port=port)
        rc = att.watch()
        att.kill_group()
        self._reap(nodes)  # pdsh leaves remote ranks behind when it is killed
        return self.ended(rc)

    def _reap(self, nodes: list[remote.Node]) -> None:
        tag = f"{self.dir.name}:{self.att.number}"
        for n in nodes:
            argv = remote.ssh_argv(
                self.cluster, n.host, [self.cluster.python, "-m", "jupyter_llm.launcher.node", "reap", tag]
            )
            remote.run_quiet(argv, timeout=30)


class SlurmRunner(ClusterRunner):
    """sbatch on a shared filesystem: Slurm picks the nodes (nothing to probe or copy), the
    ranks see the stop file themselves, `scancel` ends what a stop's grace period could not,
    and a requeued job (preemption) is the run's next attempt."""

    def __init__(self, att: Attempt, cluster: Cluster | None):
        super().__init__(att, cluster)
        self.job_id = ""
        self.cancelled = False

    def launch(self) -> int:
        att, c = self.att, self.cluster
        att.set_status(State.STARTING, phase="data")
        if err := self.prepare_data():
            return att.fail(err)
        nodes = slurm.plan(self.spec, c, self.dir)
        (self.dir / "hostfile").write_text(remote.hostfile(nodes))
        port = self.spec.distributed.master_port or slurm.port_for(att.run.id)
        cmd = commands(self.spec, c, self.dir, port, nodes, attempt=att.number)[0]
        path = Path(cmd.argv[-1])
        path.write_text(cmd.script or "")
        if att.stop_signal is not None:
            return att.finish(State.STOPPED, 0, None)
        try:
            out = subprocess.run(cmd.argv, capture_output=True, text=True, cwd=self.dir,
                                 timeout=slurm.CTL_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            return att.fail(f"sbatch did not answer within {slurm.CTL_TIMEOUT_S:g} s: is the Slurm "
                             "controller reachable (`scontrol ping`)? Nothing was submitted that we know of")  # fmt: skip
        if out.returncode != 0:
            return att.fail(f"sbatch refused the job: {(out.stderr or out.stdout).strip()[-500:]}")
        job_id = self.job_id = slurm.parse_job_id(out.stdout)
        att.event(Event.LAUNCHED, attempt=att.number, slurm_job=job_id, master_port=port, script=str(path))
        att.set_status(State.RUNNING, phase=None, slurm_job=job_id, master_port=port,
                       world_size=sum(n.slots for n in nodes))  # fmt: skip
        unreachable_since: float | None = None
        state: str | None = ""
        prev, base, requeues = "", att.number, 0
        settling: float | None = None  # since when a self-requeued job shows an end state
        for _ in att.polls(self._cancel, every_s=2.0):
            if (state := slurm.job_state(job_id)) not in slurm.ACTIVE | {slurm.UNREACHABLE}:
                settling = time.monotonic() if settling is None else settling
                if not self._requeuing() or time.monotonic() - settling > SLURM_REQUEUE_SETTLE_S:
                    break
                continue
            settling = None
            if state != slurm.UNREACHABLE and state != prev:
                assert state is not None
                requeues = self._requeued(base, requeues, state)
                prev = state
            if state != slurm.UNREACHABLE:
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
                att.event(Event.SLURM_UNREACHABLE, slurm_job=job_id)
            elif time.monotonic() - unreachable_since > SLURM_UNREACHABLE_S:
                with contextlib.suppress(slurm.SlurmTimeout):
                    slurm.ctl(slurm.cancel_argv(job_id))
                return att.fail(f"squeue did not answer for {SLURM_UNREACHABLE_S:g} s: Slurm job {job_id} "
                                 "was asked to cancel; check the controller (`scontrol ping`), then resume")  # fmt: skip
        final_state, rc = slurm.final_state(job_id)
        att.event(Event.SLURM_FINISHED, slurm_job=job_id, state=final_state or state, exit_code=rc)

        def why() -> tuple[str, dict[str, Any] | None]:
            failure = diagnose(self.dir, att.number, rc, None, [])
            return f"Slurm job {job_id} ended {final_state}: {failure.sentence()}", failure.model_dump()

        return att.conclude(0 if final_state == "COMPLETED" else (rc or 1), why)

    def _cancel(self, name: str) -> str | None:
        """The stop ladder under Slurm: the ranks read the stop file (shared filesystem); once
        the grace period is over, one scancel (Slurm signals the job's steps itself)."""
        if name == STOP or self.cancelled:
            return None
        self.cancelled = True
        try:
            slurm.ctl(slurm.cancel_argv(self.job_id))
        except slurm.SlurmTimeout as e:
            self.att.event(Event.SCANCEL_FAILED, reason=str(e))
        return "scancel"

    def _requeuing(self) -> bool:
        """Did the job's batch shell take Slurm's USR1 warning (it then checkpoints and requeues
        itself), with no stop of ours since? Its stop request says so until the next attempt."""
        return not self.cancelled and (read_json(stop_file(self.dir)) or {}).get("reason") == slurm.PREEMPTED

    def _requeued(self, base: int, seen: int, state: str) -> int:
        """Slurm requeued the job (preemption, its time limit's USR1 warning, a node failure,
        `scontrol requeue`): the same run goes on as its next attempt, from the newest complete
        checkpoint. Returns the requeues seen so far."""
        att = self.att
        n = slurm.restarts(self.job_id) if state in slurm.ACTIVE else None
        if n is not None and n > seen:
            stop = read_json(stop_file(self.dir)) or {}
            why = ("preempted: warned with USR1 before the time limit, checkpointed and requeued itself"
                   if stop.get("reason") == slurm.PREEMPTED else "requeued by Slurm (preemption, a node "
                   "failure or scontrol requeue); it continues from the newest complete checkpoint")  # fmt: skip
            att.number = base + n
            total = int(att.run.status().get("restarts") or 0) + 1
            att.event(Event.REQUEUED, slurm_job=self.job_id, restart=total, attempt=att.number, reason=why)
            att.set_status(State.RESUMING, attempt=att.number, restarts=total,
                           last_restart={"time": now_iso(), "reason": why, "class": "infrastructure: requeued"})  # fmt: skip
            seen = n
        if state == "RUNNING" and att.run.status()["state"] == State.RESUMING.value:
            att.set_status(State.RUNNING)
        return seen
