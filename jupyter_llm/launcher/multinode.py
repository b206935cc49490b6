"""The supervisor's side of a run on a cluster: ssh (one agent per node), pdsh, Slurm.

Pre-flight, data preparation here, the push of the run folder (no shared filesystem),
the launch, the watch (fail fast: when one node fails, every other node's job is killed),
the pull of metrics/events/checkpoints while it runs and of the final model at the end.
The supervisor (`supervisor.Supervisor`) keeps owning every status transition.
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
from typing import TYPE_CHECKING, Any

from ..cluster import Cluster
from ..files import now_iso, read_json
from ..folder import CKPT_MARKER, State
from . import remote, slurm, system
from .backends import commands
from .local import job_env, rank_env
from .watch import StopLadder, diagnose

if TYPE_CHECKING:
    from .supervisor import Supervisor

SLURM_UNREACHABLE_S = 300.0  # squeue silent this long: the job is cancelled and the run fails
KILL_WAIT_S = 10.0  # after fail-fast KILL, before the ssh connections are cut
SSHD_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]  # sshd's default
PDSH_SAFE = re.compile(r"[\w@%+=:,./-]+")  # what DeepSpeed's pdsh runner leaves unquoted


class MultiNode:
    def __init__(self, sup: Supervisor, cluster: Cluster, attempt: int):
        self.sup, self.cluster, self.attempt = sup, cluster, attempt
        self.dir = sup.dir
        self.spec = sup.run.spec
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def log(self, text: str) -> None:
        with open(self.dir / "logs" / "supervisor.log", "a") as f:
            f.write(f"{now_iso()} {text}\n")

    # -- the common part ------------------------------------------------------------------

    def supervise(self) -> int:
        # one shared ssh connection per node for the copies (a short socket path: /tmp)
        self.control = tempfile.mkdtemp(prefix="jllm-ssh-", dir="/tmp")
        try:
            return self._supervise()
        finally:
            remote.close_shared(self.cluster, remote.plan_nodes(self.cluster, self.sup.run.id, self.dir, 1),
                                self.control)  # fmt: skip

    def _supervise(self) -> int:
        sup, c = self.sup, self.cluster
        if c.launcher == "slurm":  # Slurm picks the nodes: nothing to probe or copy
            return self._slurm()
        pp = self.spec.distributed.procs_per_node
        nodes = remote.plan_nodes(c, self.sup.run.id, self.dir, pp if isinstance(pp, int) else 0)
        sup.set_status(State.STARTING, phase="preflight")
        inputs = [Path(f) for f in [*self.spec.data.train, *(self.spec.data.validation or [])]]
        pre_dir = (
            self.spec.model.pretrained
            if self.spec.model.pretrained and os.path.isdir(self.spec.model.pretrained)
            else None
        )
        sync_bytes = 0 if c.shared_fs else remote.tree_bytes(*inputs, Path(pre_dir) if pre_dir else None)
        d = self.spec.distributed
        nvme = d.nvme_path if d.offload == "nvme" else None  # checked on every node
        pf = remote.preflight(c, nodes, d.master_port, sync_bytes, expect=str(self.dir) if c.shared_fs else None,
                              nvme=nvme)  # fmt: skip
        sup.event(
            "preflight", ok=pf.ok, checks=[{"name": n, "ok": ok, "detail": d} for n, ok, d in pf.checks]
        )
        if not pf.ok:
            return sup.fail("pre-flight failed: " + "; ".join(pf.problems))
        nodes = [remote.Node(n.index, n.host, n.run_dir, n.slots or 1) for n in pf.nodes]
        assert pf.master_port is not None
        port = pf.master_port
        if sup.stop_signal is not None:
            return sup.finish(State.STOPPED, 0, None)
        sup.set_status(State.STARTING, phase="data")
        if err := self._prepare_data():
            return sup.fail(err)
        (self.dir / "hostfile").write_text(remote.hostfile(nodes))
        if c.launcher == "pdsh":
            return self._pdsh(nodes, port, cpu=pf.cpu)
        syncer = None
        if not c.shared_fs:
            sup.set_status(State.STARTING, phase="sync")
            data_dir = Path((read_json(self.dir / "data.json") or {})["path"])
            problems = remote.push(c, nodes, self.dir, data_dir, pre_dir, self.log, self.control)
            if problems:
                return sup.fail("; ".join(problems))
            syncer = remote.Syncer(c, nodes, self.dir, CKPT_MARKER, self.control)
            syncer.start()
        if sup.stop_signal is not None:  # stopped while the data was prepared or copied
            return sup.finish(State.STOPPED, 0, None)
        return self._ssh(nodes, port, pf.cpu, syncer)

    def _prepare_data(self) -> str | None:
        """Tokenizer and packed data are made here, once, then travel to the nodes."""
        argv = [sys.executable, "-u", "-m", "jupyter_llm.train.prepare", str(self.dir)]
        env = job_env(self.dir, self.attempt)
        with open(self.dir / "logs" / "prepare.log", "ab") as log:
            rc = subprocess.run(argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT).returncode  # fmt: skip
        if rc == 0:
            return None
        failure = read_json(self.dir / "failures" / "rank0.json")
        if failure and failure.get("attempt") == self.attempt:
            return f"data preparation failed: {failure['type']}: {failure['message']}"
        return f"data preparation exited with code {rc}; see logs/prepare.log"

    # -- ssh: one agent per node ----------------------------------------------------------

    def _ssh(self, nodes: list[remote.Node], port: int, cpu: bool, syncer: remote.Syncer | None) -> int:
        sup, c = self.sup, self.cluster
        addr = remote.master_addr(c)
        env = job_env(self.dir, self.attempt)  # the tag lets a later attempt reap stale ssh clients
        cmds = commands(self.spec, c, self.dir, port, nodes, attempt=self.attempt, cpu=cpu)
        for n, cmd in zip(nodes, cmds, strict=True):
            argv = cmd.argv
            with open(self.dir / "logs" / f"node{n.index}.log", "ab") as log:
                log.write(f"\n== attempt {self.attempt} at {now_iso()}: {' '.join(argv)}\n".encode())
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
        sup.event("launched", attempt=self.attempt, ranks=world, master_port=port, master_addr=addr,
                  nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots, "run_dir": n.run_dir} for n in nodes])  # fmt: skip
        sup.set_status(State.RUNNING, phase=None, world_size=world, master_port=port, master_addr=addr,
                       nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots} for n in nodes])  # fmt: skip
        failed: tuple[int, int] | None = None  # (node, exit code) of the first node that failed
        failed_at = 0.0
        ladder = StopLadder(sup.grace_s)
        last_sync = time.monotonic()
        sup.launched_at = time.time()
        offsets = {n.index: (self.dir / "logs" / f"node{n.index}.log").stat().st_size
                   if (self.dir / "logs" / f"node{n.index}.log").exists() else 0 for n in nodes}  # fmt: skip
        while True:
            time.sleep(0.25)
            for i in offsets:  # the agents' system samples, into system.jsonl
                offsets[i] = system.collect(self.dir / "logs" / f"node{i}.log", offsets[i], self.dir)
            rcs = {i: p.poll() for i, p in self.procs.items()}
            if sup.handle_stop():
                self._send("stop")
            sup.check_hang()  # the synced files went quiet
            if failed is None:
                for name, waited in ladder.due(sup.stop_requested_at):
                    sup.event("signal", signal=name, after_s=waited)
                    self._send(f"signal {name.removeprefix('SIG')}")
            if failed is None and sup.stop_requested_at is None:  # a stop's own exits are no failure
                bad = [(i, rc) for i, rc in rcs.items() if rc not in (None, 0)]
                if bad:
                    failed, failed_at = bad[0], time.monotonic()
                    sup.event("node_failed", node=failed[0], exit_code=failed[1])
                    self._send("signal KILL")  # fail fast: the other nodes' ranks would hang
            elif failed is not None and time.monotonic() - failed_at > KILL_WAIT_S:
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
            _, result = remote.parse_node_log(self.dir / "logs" / f"node{n.index}.log")
            if result and result.get("swap_removed"):
                sup.event("swap_removed", path=result["swap_removed"], node=n.index)
        sup.set_status(State(sup.run.status()["state"]), nodes=[{"node": n.index, "host": n.host.label, "slots": n.slots,
                                                       "exit_code": codes[n.index]} for n in nodes])  # fmt: skip
        if failed is not None:  # a node's ranks failed, or the node itself (ssh lost: exit 255)
            node = nodes[failed[0]]
            failure = self._failure(node) or {"cause": "launcher", "node": node.index, "exit_code": failed[1]}
            return sup.fail_or_restart(self._why(node, failed[1]), failed[1], failure)
        return self._ended(max(codes.values()))

    def _why(self, node: remote.Node, rc: int) -> str:
        _, result = remote.parse_node_log(self.dir / "logs" / f"node{node.index}.log")
        if result and result.get("error"):
            what = result["error"]
        elif rc == 255:
            what = f"the ssh connection failed or was lost (exit 255); see logs/node{node.index}.log"
        else:
            what = f"exited with code {rc}; see logs/node{node.index}.log"
        return f"{node.label}: {what}; the job was stopped on every node"

    def _failure(self, node: remote.Node) -> dict[str, Any] | None:
        """The failed node's structured failure (its agent's diagnosis), with the node named."""
        _, result = remote.parse_node_log(self.dir / "logs" / f"node{node.index}.log")
        failure = (result or {}).get("failure")
        return {**failure, "node": node.index} if failure else None

    def _ended(self, rc: int) -> int:
        return self.sup.conclude(rc, lambda: (f"the job failed (exit {rc}); see logs/", None))

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

    # -- pdsh: DeepSpeed's own multi-node launcher ----------------------------------------

    def _pdsh(self, nodes: list[remote.Node], port: int, cpu: bool) -> int:
        sup, c = self.sup, self.cluster
        (self.dir / "hostfile.pdsh").write_text(remote.pdsh_hostfile(nodes))
        cmd = commands(self.spec, c, self.dir, port, nodes, attempt=self.attempt, cpu=cpu)[0]
        argv, env = cmd.argv, {**job_env(self.dir, self.attempt), **cmd.env}
        base = rank_env(self.dir, self.attempt, nodes[0].slots, cpu=cpu, base_env={},
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
            return sup.fail(f"launcher pdsh cannot pass {unsafe[0]!r} safely (DeepSpeed's pdsh mode quotes "
                             "only lightly); use launcher: ssh for such values or paths")  # fmt: skip
        (self.dir / "ds_env").write_text("".join(f"{k}={v}\n" for k, v in ranks.items()))
        pgid = sup.spawn(argv, env, self.attempt)
        world = sum(n.slots for n in nodes)
        sup.event(
            "launched", attempt=self.attempt, ranks=world, master_port=port, command=argv, job_pgid=pgid
        )
        sup.set_status(State.RUNNING, phase=None, job_pgid=pgid, world_size=world, master_port=port)
        rc = sup.watch()
        sup.kill_group()
        self._reap(nodes)  # pdsh leaves remote ranks behind when it is killed
        return self._ended(rc)

    def _requeued(self, job_id: str, base: int, seen: int, state: str) -> int:
        """Slurm requeued the job (preemption, its time limit's USR1 warning, a node failure,
        `scontrol requeue`): the same run goes on as its next attempt, from the newest complete
        checkpoint. Returns the requeues seen so far."""
        sup = self.sup
        n = slurm.restarts(job_id) if state in slurm.ACTIVE else None
        if n is not None and n > seen:
            stop = read_json(self.dir / "control" / "stop") or {}
            why = ("preempted: warned with USR1 before the time limit, checkpointed and requeued itself"
                   if stop.get("reason") == slurm.PREEMPTED else "requeued by Slurm (preemption, a node "
                   "failure or scontrol requeue); it continues from the newest complete checkpoint")  # fmt: skip
            self.attempt = sup.attempt = base + n
            total = int(sup.run.status().get("restarts") or 0) + 1
            sup.event("requeued", slurm_job=job_id, restart=total, attempt=self.attempt, reason=why)
            sup.set_status(State.RESUMING, attempt=self.attempt, restarts=total,
                           last_restart={"time": now_iso(), "reason": why, "class": "infrastructure: requeued"})  # fmt: skip
            seen = n
        if state == "RUNNING" and sup.run.status()["state"] == State.RESUMING.value:
            sup.set_status(State.RUNNING)
        return seen

    def _reap(self, nodes: list[remote.Node]) -> None:
        tag = f"{self.dir.name}:{self.attempt}"
        for n in nodes:
            argv = remote.ssh_argv(
                self.cluster, n.host, [self.cluster.python, "-m", "jupyter_llm.launcher.node", "reap", tag]
            )
            remote.run_quiet(argv, timeout=30)

    # -- Slurm ---------------------------------------------------------------------------

    def _slurm(self) -> int:
        sup, c = self.sup, self.cluster
        sup.set_status(State.STARTING, phase="data")
        if err := self._prepare_data():
            return sup.fail(err)
        nodes = slurm.plan(self.spec, c, self.dir)
        (self.dir / "hostfile").write_text(remote.hostfile(nodes))
        port = self.spec.distributed.master_port or slurm.port_for(self.sup.run.id)
        cmd = commands(self.spec, c, self.dir, port, nodes, attempt=self.attempt)[0]
        path = Path(cmd.argv[-1])
        path.write_text(cmd.script or "")
        try:
            out = subprocess.run(cmd.argv, capture_output=True, text=True, cwd=self.dir,
                                 timeout=slurm.CTL_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            return sup.fail(f"sbatch did not answer within {slurm.CTL_TIMEOUT_S:g} s: is the Slurm "
                             "controller reachable (`scontrol ping`)? Nothing was submitted that we know of")  # fmt: skip
        if out.returncode != 0:
            return sup.fail(f"sbatch refused the job: {(out.stderr or out.stdout).strip()[-500:]}")
        job_id = slurm.parse_job_id(out.stdout)
        sup.event("launched", attempt=self.attempt, slurm_job=job_id, master_port=port, script=str(path))
        sup.set_status(State.RUNNING, phase=None, slurm_job=job_id, master_port=port,
                       world_size=sum(n.slots for n in nodes))  # fmt: skip
        ladder = StopLadder(sup.grace_s)
        cancelled = False
        unreachable_since: float | None = None
        prev, base, requeues = "", self.attempt, 0
        while (state := slurm.job_state(job_id)) in slurm.ACTIVE | {slurm.UNREACHABLE}:
            if state != slurm.UNREACHABLE and state != prev:
                requeues = self._requeued(job_id, base, requeues, state)
                prev = state
            if state != slurm.UNREACHABLE:
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
                sup.event("slurm_unreachable", slurm_job=job_id)
            elif time.monotonic() - unreachable_since > SLURM_UNREACHABLE_S:
                with contextlib.suppress(slurm.SlurmTimeout):
                    slurm.ctl(slurm.cancel_argv(job_id))
                return sup.fail(f"squeue did not answer for {SLURM_UNREACHABLE_S:g} s: Slurm job {job_id} "
                                 "was asked to cancel; check the controller (`scontrol ping`), then resume")  # fmt: skip
            time.sleep(2.0)
            sup.handle_stop()  # shared filesystem: the ranks see the stop file
            if ladder.due(sup.stop_requested_at) and not cancelled:  # Slurm signals the job itself
                cancelled = True
                sup.event("signal", signal="scancel")
                try:
                    slurm.ctl(slurm.cancel_argv(job_id))
                except slurm.SlurmTimeout as e:
                    sup.event("scancel_failed", reason=str(e))
        final_state, rc = slurm.final_state(job_id)
        sup.event("slurm_finished", slurm_job=job_id, state=final_state or state, exit_code=rc)

        def why() -> tuple[str, dict[str, Any] | None]:
            failure = diagnose(self.dir, self.attempt, rc, None, [])
            return f"Slurm job {job_id} ended {final_state}: {failure.sentence()}", failure.model_dump()

        return sup.conclude(0 if final_state == "COMPLETED" else (rc or 1), why)
