"""Remote and multi-node launch through a real sshd on 127.0.0.2 and 127.0.0.3.

The two "nodes" are loopback aliases of this machine with separate work folders, so nothing
is shared unless a test says so: the run folder travels with rsync, metrics come back while
the job runs, the final model at the end. Unit tests of the pure builders come first.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from sshd import Sshd, require, start_sshd

from conftest import tiny_spec, wait_for
from jupyter_llm import launch
from jupyter_llm.cluster import Cluster, Host, resolve
from jupyter_llm.errors import SpecError, UserError
from jupyter_llm.launcher import remote, slurm
from jupyter_llm.runs import CKPT_MARKER, Run, RunStore
from jupyter_llm.spec import Spec

# every character a shell would act on, in a node's work folder and a variable for the ranks
NASTY = "we ird; $(touch PWNED1) `touch PWNED2` 'q' \"dq\" * \\ & | > x\nline"


# -- pure builders ---------------------------------------------------------------------


def _cluster(**kw: Any) -> Cluster:
    return Cluster.model_validate({"hosts": ["u@10.1.2.3:2200", "gpu-b"], **kw})


def test_remote_command_reaches_the_node_verbatim() -> None:
    c = _cluster(activate="source /opt/venv/bin/activate", env={"X": NASTY},
                 ssh={"identity": "/k/id", "known_hosts": "/k/known", "options": {"Compression": "yes"}})  # fmt: skip
    node = remote.Node(1, c.hosts[1], f"/w/{NASTY}/run", 2)
    argv = remote.agent_argv(c, node, attempt=3, master_addr="10.1.2.3", master_port=29501, cpu=False,
                             data="data", pretrained=None)  # fmt: skip
    assert argv[0] == "ssh" and argv[-3:-1] == ["--", "gpu-b"]
    for opt in ("BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/k/known", "IdentitiesOnly=yes",
                "Compression=yes"):  # fmt: skip
        assert opt in argv
    activation, _, line = argv[-1].partition(" && exec ")
    assert activation == "source /opt/venv/bin/activate"
    words = shlex.split(line)  # what the node's shell makes of it
    assert words[words.index("run") + 1] == f"/w/{NASTY}/run"
    assert "--env" not in words and not any("X=" in w for w in argv)  # variables go over stdin
    assert json.loads(remote.agent_hello(c)) == {"env": {"X": NASTY}}
    assert words[words.index("--node-rank") + 1] == "1" and "--cpu" not in words
    u = remote.ssh_argv(c, c.hosts[0], ["true"])
    assert u[u.index("-p") + 1] == "2200" and u[u.index("-l") + 1] == "u"


def test_cluster_file_and_bad_clusters(tmp_path: Path) -> None:
    f = tmp_path / "clusters.yaml"
    f.write_text(yaml.safe_dump({"pair": {"hosts": ["127.0.0.2:2222", {"host": "127.0.0.3", "port": 2222}],
                                          "workdir": "/scratch"}}))  # fmt: skip
    c = resolve("pair", f)
    assert c is not None and [h.label for h in c.hosts] == ["127.0.0.2:2222", "127.0.0.3:2222"]
    assert resolve(1) is None and resolve(["a", "b"]).hosts[1].host == "b"  # type: ignore[union-attr]
    with pytest.raises(UserError, match=r"no cluster named 'other'.*known: pair"):
        resolve("other", f)
    bad = [({"hosts": ["-oProxyCommand=x"]}, "not a host"),
           ({"hosts": ["a"], "ssh": {"options": {"StrictHostKeyChecking": "no"}}}, "cannot be overridden"),
           ({"hosts": ["a"], "launcher": "pdsh"}, "needs shared_fs"),
           ({"hosts": ["a", "a"]}, "listed twice"),
           ({"hosts": ["a"], "env": {"BAD-NAME": "1"}}, "not an environment variable")]  # fmt: skip
    for body, message in bad:
        with pytest.raises(UserError, match=message):
            resolve(body)
    with pytest.raises(SpecError, match=r"distributed\.nodes"):
        Spec.from_dict({**tiny_spec(tmp_path / "c.txt"), "distributed": {"nodes": 3}}, check_files=False)
    assert Spec.from_dict(
        {**tiny_spec(tmp_path / "c.txt"), "distributed": {"nodes": "pair"}}, check_files=False
    )


def test_slurm_script_follows_the_spec(tmp_path: Path) -> None:
    c = Cluster.model_validate({"hosts": ["n1", "n2", "n3"], "launcher": "slurm", "shared_fs": True,
                                "python": "/opt/env/bin/python", "env": {"NCCL_DEBUG": "INFO", "X": NASTY},
                                "slurm": {"partition": "gpu", "time": "01:00:00", "gpus_per_node": 4, "extra": ["--qos=high"]}})  # fmt: skip
    spec = Spec.from_dict(
        {**tiny_spec(tmp_path / "c.txt"), "distributed": {"procs_per_node": 4}}, check_files=False
    )
    run_dir = tmp_path / "runs" / "20260101-000000-000-tiny-ab12"
    nodes = [remote.Node(i, h, str(run_dir), 4) for i, h in enumerate(c.hosts)]
    script = slurm.sbatch_script(spec, c, run_dir, nodes, 24567, attempt=2)
    sb = dict(
        [*ln[len("#SBATCH --") :].split("=", 1), ""][:2]
        for ln in script.splitlines()
        if ln.startswith("#SBATCH --")
    )
    assert sb["nodes"] == "3" and sb["ntasks-per-node"] == "1" and sb["gpus-per-node"] == "4"
    assert sb["partition"] == "gpu" and sb["time"] == "01:00:00" and sb["qos"] == "high"
    assert sb["job-name"] == f"jllm-{run_dir.name}" and sb["chdir"] == str(run_dir)
    assert "requeue" in sb and sb["signal"] == "B:USR1@120" and sb["open-mode"] == "append"  # preemption
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert srun.endswith(" &")  # in the background: the USR1 trap runs while the script waits
    inner = shlex.split(srun)[-2]
    words = shlex.split(inner)
    assert words[:5] == ["exec", "/opt/env/bin/python", "-u", "-m", "jupyter_llm.launcher.ranks"]
    assert words[-2:] == ["jupyter_llm.train", str(run_dir)]
    # as bash -c expands it on node 2 of 3 (4 ranks each)
    shown = subprocess.run(["bash", "-c", inner.replace("exec ", "printf '%s\\n' ", 1)], capture_output=True,
                           text=True, env={**os.environ, "SLURM_NODEID": "2", "MASTER_ADDR": "10.0.0.9"})  # fmt: skip
    argv = shown.stdout.splitlines()
    assert {"--ranks=4", "--world-size=12", "--nodes=3", "--master-port=24567", "--first-rank=8",
            "--node-rank=2", "--master-addr=10.0.0.9"} <= set(argv), argv  # fmt: skip
    # the variables, as bash on a node sets them (everything up to MASTER_ADDR, then print two)
    head = script.split("export MASTER_ADDR=")[0]
    out = subprocess.run(
        ["bash", "-c", head + 'printf "%s|%s" "$X" "$JUPYTER_LLM_JOB"'], capture_output=True, text=True
    )
    assert out.stdout == f"{NASTY}|{run_dir.name}:2", out
    requeued = subprocess.run(["bash", "-c", head + 'printf "%s" "$JUPYTER_LLM_ATTEMPT"'], capture_output=True,
                              text=True, env={**os.environ, "SLURM_RESTART_COUNT": "1"})  # fmt: skip
    assert requeued.stdout == "3"  # Slurm's first requeue is the run's next attempt
    assert slurm.parse_job_id("4711;cluster\n") == "4711" and slurm.submit_argv(Path("/a b")) == [
        "sbatch",
        "--parsable",
        "/a b",
    ]
    assert slurm.cancel_argv("4711") == ["scancel", "4711"]
    assert 20000 <= slurm.port_for(run_dir.name) < 30000


def test_a_silent_slurm_controller_times_out_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """squeue, scontrol, sacct and scancel hanging (a hung controller) cannot hang the
    supervisor: each call ends after CTL_TIMEOUT_S; the watch reads it as "ask again later"."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("squeue", "scontrol", "sacct", "scancel"):
        (bindir / tool).write_text("#!/bin/sh\nexec sleep 30\n")
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "CTL_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    assert slurm.job_state("42") == slurm.UNREACHABLE
    assert slurm.final_state("42") == (None, 1)
    with pytest.raises(slurm.SlurmTimeout, match=r"scancel did not answer within 0.5 s.*scontrol ping"):
        slurm.ctl(slurm.cancel_argv("42"))
    assert time.monotonic() - t0 < 10


def test_pdsh_command(tmp_path: Path) -> None:
    c = Cluster.model_validate({"hosts": ["127.0.0.2:2222", "127.0.0.3:2222"], "launcher": "pdsh", "shared_fs": True,
                                "ssh": {"known_hosts": "/k"}})  # fmt: skip
    nodes = remote.plan_nodes(c, "r", tmp_path, 1)
    argv, env = remote.pdsh_command(c, nodes, tmp_path, 29000)
    assert (
        argv[argv.index("--launcher") + 1] == "pdsh" and argv[argv.index("--master_addr") + 1] == "127.0.0.2"
    )
    assert (
        "StrictHostKeyChecking=yes" in shlex.split(env["PDSH_SSH_ARGS_APPEND"])
        and "2222" in env["PDSH_SSH_ARGS_APPEND"]
    )
    assert remote.pdsh_hostfile(nodes) == "127.0.0.2 slots=1\n127.0.0.3 slots=1\n"
    assert Host.parse("me@h:22").user == "me"


# -- real sshd -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


def _job_procs(run: Run) -> list[psutil.Process]:
    """Processes of this run's job on the machine (both test nodes are this machine)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("JUPYTER_LLM_JOB", "").startswith(run.id + ":") and p.pid != os.getpid():
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def test_preflight_fails_closed(sshd: Sshd, corpus: Path, tmp_path: Path) -> None:
    from jupyter_llm.preflight import dry_run

    unknown = tmp_path / "known_hosts"  # only node 0's key is known
    unknown.write_text(sshd.known_hosts.read_text().replace(f",[127.0.0.3]:{sshd.port}", ""))
    cases = {
        "unknown host key": ({"ssh": {"identity": str(sshd.identity), "known_hosts": str(unknown)}}, None,
                             f"node 1 (127.0.0.3:{sshd.port}): host key unknown"),
        "unreachable": ({"hosts": [{"host": "127.0.0.2", "port": sshd.port}, {"host": "127.0.0.4", "port": sshd.port}]},
                        None, f"node 1 (127.0.0.4:{sshd.port}): unreachable"),
    }  # fmt: skip
    busy = socket.socket()
    busy.bind(("127.0.0.2", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases["busy master port"] = ({}, port, f"master port {port} is in use on 127.0.0.2")
    try:
        for what, (extra, master_port, message) in cases.items():
            nodes = sshd.cluster(**extra)
            body = tiny_spec(
                corpus, distributed={"nodes": nodes, "procs_per_node": 1, "master_port": master_port}
            )
            dr = dry_run(Spec.from_dict(body), estimate_memory=False)
            assert not dr.ok and any(message in c.detail for c in dr.checks if not c.ok), (what, dr.checks)
            run = launch(body)
            assert run.wait(60) == "failed", what
            err = run.status()["error"]
            assert err.startswith("pre-flight failed") and message in err, (what, err)
            assert not list((run.path / "logs").glob("node*.log")), f"{what}: something was launched"
    finally:
        busy.close()
    ok = dry_run(Spec.from_dict(tiny_spec(corpus, distributed={"nodes": sshd.cluster(), "procs_per_node": 1})),
                 estimate_memory=False)  # fmt: skip
    assert ok.ok and any("same as here" in c.detail for c in ok.checks), ok.checks


def test_dry_run_shows_every_node_and_the_preflight(sshd: Sshd, corpus: Path, tmp_path: Path) -> None:
    f = tmp_path / "spec.yaml"
    f.write_text(
        yaml.safe_dump(tiny_spec(corpus, distributed={"nodes": sshd.cluster(), "procs_per_node": 1}))
    )
    out = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "train", str(f), "--dry-run"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for i, host in enumerate(("127.0.0.2", "127.0.0.3")):
        assert f"command (node {i} ({host}:{sshd.port})):" in out.stdout
        assert f"[ok] node {i} ({host}:{sshd.port}) versions: same as here" in out.stdout
    assert "[ok] master port" in out.stdout and not list(Path(os.environ["JUPYTER_LLM_HOME"]).glob("runs/2*"))
    from jupyter_llm.preflight import dry_run

    auto = sshd.cluster()  # no slots and procs_per_node auto: each node's GPUs, else 1 CPU rank
    for h in auto["hosts"]:
        del h["slots"]
    plan = dry_run(Spec.from_dict(tiny_spec(corpus, distributed={"nodes": auto, "procs_per_node": "auto"})),
                   estimate_memory=False)  # fmt: skip
    assert (
        plan.ok
        and plan.ranks == 2
        and "1 CPU rank(s) on" in next(c.detail for c in plan.checks if "ranks" in c.name)
    )
    slurm_spec = Spec.from_dict(tiny_spec(corpus, distributed={"procs_per_node": 2, "nodes": {
        "launcher": "slurm", "shared_fs": True, "slurm": {"nodes": 4}}}))  # fmt: skip
    plan = dry_run(slurm_spec, estimate_memory=False)
    assert (
        plan.ranks == 8
        and plan.commands[0].argv[0] == "sbatch"
        and "#SBATCH --nodes=4" in (plan.commands[0].script or "")
    )


def test_auto_on_a_cluster_fits_what_the_nodes_report(sshd: Sshd, corpus: Path, tmp_path: Path) -> None:
    """zero_stage/offload auto on an ssh cluster: every node is asked over ssh (its memory, the
    cgroup's limit it runs under included, its NVMe folder) and the plan fits the tightest one;
    a fixed `offload: nvme` whose folder the nodes lack fails their pre-flight, naming the node."""
    import cgroup

    from jupyter_llm.preflight import dry_run

    missing = str(tmp_path / "no-such-folder")
    dist = {
        "nodes": sshd.cluster(),
        "procs_per_node": 1,
        "zero_stage": "auto",
        "offload": "auto",
        "nvme_path": missing,
    }
    spec = Spec.from_dict(tiny_spec(corpus, distributed=dist))
    dr = dry_run(spec)
    assert dr.ok and dr.fit is not None and dr.fit.chosen is not None, str(dr)
    assert (dr.fit.chosen.stage, dr.fit.chosen.offload) == (0, "none") and dr.spec.distributed.zero_stage == 0
    res = dr.fit.resources
    assert res.host_source.startswith("node ") and "MemAvailable" in res.host_source, res
    assert res.nvme_problem and res.nvme_problem.startswith("node 0") and "does not exist" in res.nvme_problem
    if cgroup.available():  # the nodes' processes are sshd's children: confine sshd, ask again
        with cgroup.memory_limit(f"jllm-sshd-{os.getpid()}", 3 * 2**30) as group:
            (group / "cgroup.procs").write_text(str(sshd.pid))
            try:
                dr = dry_run(spec)
            finally:
                (cgroup.ROOT / "cgroup.procs").write_text(str(sshd.pid))  # out again before removal
        assert dr.fit is not None and "limit 3.00 GiB" in dr.fit.resources.host_source, dr.fit.resources
        assert dr.fit.resources.host_bytes <= 3 * 2**30
    fixed = Spec.from_dict(tiny_spec(corpus, distributed={**dist, "zero_stage": 3, "offload": "nvme"}))
    dr = dry_run(fixed, estimate_memory=False)
    bad = [c for c in dr.checks if not c.ok]
    assert bad and all(c.name.endswith(" nvme") and "does not exist" in c.detail for c in bad), dr.checks
    labels = [f"node {i} ({h}:{sshd.port})" for i, h in enumerate(("127.0.0.2", "127.0.0.3"))]
    assert sorted(c.detail.split(": ")[0] for c in bad) == labels, bad


@pytest.mark.deepspeed
def test_two_nodes_zero2_via_cluster_file(sshd: Sshd, corpus: Path, tmp_path: Path) -> None:
    """2 nodes x 1 rank, ZeRO-2, nodes named by a cluster file, launched with the CLI; the
    work folders and a variable for the ranks carry every shell metacharacter."""
    home = Path(os.environ["JUPYTER_LLM_HOME"])
    work = [str(tmp_path / f"n{i}" / NASTY) for i in range(2)]
    (home / "clusters.yaml").write_text(yaml.safe_dump({"pair": sshd.cluster(work, env={
        **sshd.cluster()["env"], "JLLM_NASTY": NASTY}, sync_every_s=0.5)}))  # fmt: skip
    spec = tiny_spec(corpus, distributed={"nodes": "pair", "procs_per_node": 1, "zero_stage": 2},
                     train={"max_steps": 60, "save_every": 30, "log_every": 5, "eval_every": 30})  # fmt: skip
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "train", str(f)], capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    run = Run(next(p for p in (home / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")))
    # metrics arrive here while the job runs on the nodes
    seen = wait_for(
        lambda: (
            (run.state == "running" and [m for m in run.metrics() if "loss" in m]) or run.status()["error"]
        ),
        300,
        "metrics while running",
    )
    assert isinstance(seen, list) and run.state in ("running", "completed"), run.status()["error"]
    assert run.wait(300) == "completed", (run.status(), run.log_tail(40))
    st = run.status()
    assert [n["exit_code"] for n in st["nodes"]] == [0, 0] and st["world_size"] == 2
    assert (run.path / "final" / "config.json").is_file() and (
        run.path / "final" / "model.safetensors"
    ).is_file()
    steps = [m["step"] for m in run.metrics() if "loss" in m]
    assert steps[-1] == 60
    # each node's agent sampled its system and the supervisor wrote it here, per node
    assert {ln["node"].split(" ")[0] for ln in run.system()} == {"node0", "node1"}
    remote_dirs = [Path(w) / run.id for w in work]
    assert (remote_dirs[0] / "metrics.jsonl").read_bytes() == (run.path / "metrics.jsonl").read_bytes()
    # the checkpoint came back whole: model states from rank 0, optimizer shards of both ranks' nodes
    ck = run.path / "checkpoints" / "step00000030"
    shard = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    names = {p.name for p in ck.iterdir()}
    assert {CKPT_MARKER, "mp_rank_00_model_states.pt", shard.format(0), shard.format(1)} <= names, names
    on_node1 = {p.name for p in (remote_dirs[1] / "checkpoints" / ck.name).iterdir()}
    assert shard.format(1) in on_node1 and shard.format(0) not in on_node1  # each node had only its part
    # every shell metacharacter arrived verbatim, and no command hidden in them ran
    rec = json.loads((remote_dirs[1] / "nodes" / "node1.json").read_text())
    assert (
        rec["argv"][rec["argv"].index("run") + 1] == str(remote_dirs[1]) and "JLLM_NASTY" in rec["env_keys"]
    )
    for d in (tmp_path, tmp_path / "n0", tmp_path / "n1", *remote_dirs, Path.home(), Path("/")):
        assert not (d / "PWNED1").exists() and not (d / "PWNED2").exists()
    assert not _job_procs(run)
    # the evaluation runs here, on the model that came back
    ev = run.evaluate(max_new_tokens=4, prompts=["ROMEO:"])
    assert ev.wait(120) == "completed" and ev.result["perplexity"]["ppl"] > 1


@pytest.mark.deepspeed
def test_killed_rank_on_one_node_stops_the_job(sshd: Sshd, corpus: Path) -> None:
    """A shared filesystem this time: both agents work in the run folder itself."""
    run = launch(
        tiny_spec(
            corpus,
            distributed={
                "nodes": sshd.cluster(shared_fs=True),
                "procs_per_node": 1,
                "zero_stage": "auto",
                "offload": "auto",
            },
            train={"max_steps": 100000, "save_every": 0, "log_every": 5, "max_restarts": 0},
        )
    )  # max_restarts 0: this test is about the report of the failure, not a restart
    # auto: fitted before launch to what the nodes reported over ssh
    plan = json.loads((run.path / "fit.json").read_text())
    assert plan["resources"]["host_source"].startswith("node ") and plan["chosen"] == {
        "zero_stage": 0,
        "offload": "none",
    }
    assert run.spec.distributed.zero_stage == 0
    info = run.path / "ranks" / "rank1.json"
    wait_for(lambda: info.is_file() and [m for m in run.metrics() if "loss" in m], 300, "rank 1 training")
    pid = json.loads(info.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert run.wait(60) == "failed"
    took = time.monotonic() - t0
    err = run.status()["error"]
    assert f"node 1 (127.0.0.3:{sshd.port})" in err and f"rank 1 (pid {pid})" in err, err
    assert took < 30, took
    wait_for(lambda: not _job_procs(run), 15, "no process of the job left")


@pytest.mark.deepspeed
def test_stop_from_the_notebook_leaves_nothing_on_the_nodes(
    sshd: Sshd, corpus: Path, tmp_path: Path, ip: Any
) -> None:
    work = [str(tmp_path / f"n{i}") for i in range(2)]
    nodes = sshd.cluster(work)
    nodes["env"]["JLLM_NASTY"] = NASTY
    body = tiny_spec(corpus, distributed={"nodes": nodes, "procs_per_node": 1, "zero_stage": 3},
                     train={"max_steps": 100000, "save_every": 0, "log_every": 5})  # fmt: skip
    run = launch(body)
    wait_for(lambda: [m for m in run.metrics() if "loss" in m], 300, "training")
    # the variable reached the rank on node 1 verbatim (it travelled over the agent's stdin)
    rank1 = json.loads((Path(work[1]) / run.id / "ranks" / "rank1.json").read_text())
    assert psutil.Process(rank1["pid"]).environ()["JLLM_NASTY"] == NASTY
    agents = [
        json.loads((Path(w) / run.id / "nodes" / f"node{i}.json").read_text()) for i, w in enumerate(work)
    ]
    ip.run_line_magic("llm_stop", run.id)
    assert run.wait(120) == "stopped", run.status()
    ev = [e["event"] for e in run.events()]
    assert "stopped_at" in ev, ev
    step = next(e["step"] for e in reversed(run.events()) if e["event"] == "stopped_at")
    assert (run.path / "checkpoints" / f"step{step:08d}" / CKPT_MARKER).is_file()  # came back whole
    wait_for(lambda: not _job_procs(run), 15, "no process of the job left")
    for a in agents:
        assert not psutil.pid_exists(a["agent_pid"]) and not psutil.pid_exists(a["job_pgid"])
    # and it resumes on the nodes from that checkpoint
    run.resume()
    wait_for(lambda: any(e["event"] == "resumed_from" for e in run.events()), 300, "resumed")
    assert next(e["step"] for e in run.events() if e["event"] == "resumed_from") == step
    run.stop(wait=True, timeout=120)
    wait_for(lambda: not _job_procs(run), 15, "no process of the job left")


@pytest.mark.deepspeed
def test_pdsh_mode_on_a_shared_filesystem(sshd: Sshd, corpus: Path, tmp_path: Path) -> None:
    """DeepSpeed's own pdsh launcher as the option; stopping reaps what pdsh leaves on the nodes."""
    require(("pdsh",), "pdsh")
    run = launch(tiny_spec(corpus, distributed={"nodes": sshd.cluster(shared_fs=True, launcher="pdsh"),
                                                "procs_per_node": 1}, train={"max_steps": 30, "save_every": 0}))  # fmt: skip
    assert run.wait(300) == "completed", (run.status(), run.log_tail(40))
    assert (run.path / "final" / "config.json").is_file() and run.status()["world_size"] == 2
    launched = next(e for e in run.events() if e["event"] == "launched")
    assert "pdsh" in launched["command"] and not _job_procs(run)


@pytest.mark.deepspeed
def test_slurm_submission_on_a_one_machine_cluster(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real sbatch/squeue/scontrol round trip: the generated script runs DeepSpeed's launcher
    under srun on the allocated node and the supervisor follows the job to its end."""
    from slurm import start_slurm

    cluster = start_slurm(tmp_path / "slurm")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    try:
        nodes = {"launcher": "slurm", "shared_fs": True, "master_addr": "127.0.0.1", "python": sys.executable,
                 "env": {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}, "slurm": {"nodes": 1}}  # fmt: skip
        run = launch(tiny_spec(corpus, distributed={"nodes": nodes, "procs_per_node": 2},
                               train={"max_steps": 20, "save_every": 0}))  # fmt: skip
        assert run.wait(300) == "completed", (run.status(), run.log_tail(40))
        job = run.status()["slurm_job"]
        finished = next(e for e in run.events() if e["event"] == "slurm_finished")
        assert finished["state"] == "COMPLETED" and finished["slurm_job"] == job
        log = (run.path / "logs" / f"slurm-{job}.log").read_text()
        assert "node 0: ranks 0..1 of 2" in log, log[-2000:]  # launcher.ranks ran under srun
        assert (run.path / "final" / "config.json").is_file() and run.status()["world_size"] == 2
    finally:
        cluster.stop()


@pytest.mark.deepspeed
def test_slurm_stop_checkpoints_then_scancel_ends_a_stuck_job(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping a Slurm run: the ranks see the stop file on the shared filesystem and save a
    checkpoint; a job whose rank is stuck is scancel'ed after the grace period. Both end
    `stopped` and leave no process of the job."""
    from slurm import start_slurm

    cluster = start_slurm(tmp_path / "slurm")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))

    def nodes(**env: str) -> dict[str, Any]:
        return {"launcher": "slurm", "shared_fs": True, "master_addr": "127.0.0.1", "python": sys.executable,
                "env": {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", **env}, "slurm": {"nodes": 1}}  # fmt: skip

    try:
        train = {"max_steps": 100000, "save_every": 0, "log_every": 2, "eval_every": 0}
        run = launch(tiny_spec(corpus, name="slurm-stop", distributed={"nodes": nodes(), "procs_per_node": 2},
                               train=train))  # fmt: skip
        wait_for(lambda: [m for m in run.metrics() if "loss" in m], 300, "training under Slurm")
        run.stop()
        assert run.wait(120) == "stopped", (run.status(), run.log_tail(40))
        ev = {e["event"]: e for e in run.events()}
        assert ev["slurm_finished"]["state"] == "COMPLETED" and "signal" not in ev  # it ended on its own
        step = ev["stopped_at"]["step"]
        assert (run.path / "checkpoints" / f"step{step:08d}" / CKPT_MARKER).is_file()
        wait_for(lambda: not _job_procs(run), 15, "no process of the job left")
        # rank 0 stalls before step 3 (fault injection) and never reads the stop file: scancel
        stuck = launch(tiny_spec(corpus, name="slurm-stuck", train={**train, "stop_grace_s": 5},
                                 distributed={"nodes": nodes(JUPYTER_LLM_FAULT="hang_at_step:3"), "procs_per_node": 2}))  # fmt: skip
        wait_for(lambda: [m for m in stuck.metrics() if m.get("step") == 2], 300, "step 2 under Slurm")
        t0 = time.monotonic()
        stuck.stop()
        assert stuck.wait(120) == "stopped", (stuck.status(), stuck.log_tail(40))
        ev = {e["event"]: e for e in stuck.events()}
        assert ev["signal"]["signal"] == "scancel" and ev["slurm_finished"]["state"] == "CANCELLED", ev
        assert "stopped_at" not in ev and 5 <= time.monotonic() - t0 < 60
        assert stuck.status()["error"].startswith("stopped without a final checkpoint")
        wait_for(lambda: not _job_procs(stuck), 30, "no process of the stuck job left")
    finally:
        cluster.stop()


@pytest.mark.deepspeed
def test_slurm_preemption_checkpoints_requeues_and_completes_as_one_run(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The USR1 warning that `--signal=B:USR1@grace` sends before a time limit (sent here with
    scancel): the ranks checkpoint and exit, the job requeues itself, Slurm runs it again, the
    ranks resume from that checkpoint, and the run completes -- one run, two attempts."""
    from slurm import start_slurm

    cluster = start_slurm(tmp_path / "slurm")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    nodes = {"launcher": "slurm", "shared_fs": True, "master_addr": "127.0.0.1", "python": sys.executable,
             "env": {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}, "slurm": {"nodes": 1}}  # fmt: skip
    try:
        run = launch(tiny_spec(corpus, name="preempt", distributed={"nodes": nodes, "procs_per_node": 2},
                               train={"max_steps": 120, "save_every": 0, "log_every": 5, "eval_every": 0}))  # fmt: skip
        wait_for(lambda: any(m.get("step", 0) >= 10 for m in run.metrics()), 300, "training under Slurm")
        job = run.status()["slurm_job"]
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        wait_for(lambda: any(e["event"] == "requeued" for e in run.events()), 120, "the requeue")
        # Slurm holds a requeued job back a while (its BeginTime); an administrator may let it go now
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30, check=False)
        assert run.wait(400) == "completed", (run.status(), run.log_tail(40))
        st = run.status()
        assert st["restarts"] == 1 and st["attempt"] == 2 and st["slurm_job"] == job, st
        events = run.events()
        requeued = next(e for e in events if e["event"] == "requeued")
        assert requeued["reason"].startswith("preempted: warned with USR1")
        stopped = [e for e in events if e["event"] == "stopped_at"][-1]["step"]
        assert [e["step"] for e in events if e["event"] == "resumed_from"] == [stopped]
        lines = [m for m in run.metrics(dedupe=False) if "loss" in m]
        assert max(m["step"] for m in lines if m["attempt"] == 1) == stopped
        assert min(m["step"] for m in lines if m["attempt"] == 2) == stopped + 5
        assert all(m["samples"] == m["step"] * 16 for m in lines)  # the data position went on exactly
        assert [r.id for r in RunStore(run.path.parent).list()] == [run.id]  # one run, not two
        assert "#SBATCH --requeue" in (run.path / "job-1.sbatch").read_text()  # submitted once
        assert not (run.path / "job-2.sbatch").exists()
    finally:
        cluster.stop()


def test_form_with_a_cluster_runs_no_ssh_and_names_an_unknown_cluster(corpus: Path, tmp_path: Path) -> None:
    from jupyter_llm.widgets import SpecForm

    body = tiny_spec(
        corpus, distributed={"nodes": {"hosts": ["127.0.0.2:1"], "ssh": {"known_hosts": "/dev/null"}}}
    )
    form = SpecForm(body)  # an unreachable node: the side panel must not wait on ssh
    assert "jupyter_llm.launcher.node" in form.command.value and "127.0.0.2" in form.command.value
    form = SpecForm(tiny_spec(corpus, distributed={"nodes": "nope"}))
    assert "no cluster named" in form.command.value and "nope" in form.command.value
