"""Dry run: what a launch would do, and whether it can, without starting anything.

Shows the validated spec, the DeepSpeed config, the exact launch command, pre-flight checks
and a memory estimate per ZeRO stage (DeepSpeed's estimators, run in a subprocess so the
caller never imports torch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fit
from .devices import gpu_count
from .files import gib_text, size_text
from .folder import SPEC_FILE
from .launcher.local import free_port, port_free
from .spec import Spec, deepspeed_config, resolve_auto


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DryRun:
    spec: Spec
    ds_config: dict[str, Any]
    command: list[str]
    ranks: int
    checks: list[Check]
    memory: dict[str, Any] | None = None
    memory_error: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    commands: list[Any] = field(default_factory=list)  # backends.Command: every place's command
    fit: Any = None  # fit.Plan: the candidates, their estimates, the one chosen and why

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __str__(self) -> str:
        lines = ["spec:", self.spec.to_yaml(), "deepspeed config:", json.dumps(self.ds_config, indent=2)]
        for c in self.commands or []:
            lines += [f"command ({c.where}):", shlex.join(c.argv)] + ([c.script] if c.script else [])
        if not self.commands:
            lines += ["command:", " ".join(self.command)]
        lines.append("checks:")
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        if self.fit is not None:
            lines += [f"ZeRO stage and offload: {self.fit.reason}", self.fit.table()]
            if self.fit.suggestions:
                lines.append("would fit: " + "; ".join(self.fit.suggestions))
        if self.memory and self.spec.distributed.zero_stage == 3:
            derived = ", ".join(f"{k}={v:,}" for k, v in self.memory["zero3_settings"].items())
            lines.append(f"ZeRO-3 settings from the model's shape (a value in deepspeed: wins): {derived}")
        if self.memory:
            lines.append(f"memory per rank, {self.memory['params']:,} parameters:")
            for stage, m in self.memory["per_rank_gib"].items():
                lines.append(
                    f"  ZeRO {stage}: device {gib_text(m['device'])}, cpu {gib_text(m['cpu'])} ({m['source']})"
                )
        elif self.memory_error:
            lines.append(f"memory estimate unavailable: {self.memory_error}")
        return "\n".join(lines)


def dry_run(spec: Spec, estimate_memory: bool = True, probe: bool = True) -> DryRun:
    """`probe=False` skips asking a cluster's nodes over ssh (the form's live side panel)."""
    from .cluster import resolve

    cluster = resolve(spec.distributed.nodes)
    if cluster is not None:
        return _dry_run_cluster(spec, cluster, estimate_memory, probe)
    gpus = gpu_count()
    ranks = local_ranks(spec, gpus)
    checks = []
    want = spec.distributed.master_port
    if want is not None:
        checks.append(
            Check("master port", port_free(want), f"{want} {'free' if port_free(want) else 'in use'}")
        )
    else:  # the command below shows this same port
        shown = free_port()
        checks.append(Check("master port", True, f"{shown} is free now; the launch takes a free one again "
                                                 "just before it starts (distributed.master_port fixes it)"))  # fmt: skip
    for mod in ("deepspeed", "torch", "transformers"):
        found = importlib.util.find_spec(mod) is not None
        checks.append(Check(f"{mod} importable", found, "found" if found else f"pip install {mod}"))
    for f in [*spec.data.train, *(spec.data.validation or [])]:
        size = os.path.getsize(f) if os.path.isfile(f) else None
        checks.append(
            Check(
                "data file",
                size is not None,
                f"{f} ({size_text(size)})" if size is not None else f"{f} missing",
            )
        )
    checks += _data_checks(spec)
    if gpus:
        checks.append(Check("ranks", ranks <= gpus, f"{ranks} rank(s) on {gpus} GPU(s)"))
    else:
        cores = os.cpu_count() or 1
        checks.append(Check("ranks", True, f"{ranks} CPU rank(s) on {cores} core(s)"
                            + (" (more ranks than cores: slow)" if ranks > cores else "")))  # fmt: skip
    from .launcher.backends import commands, local_node

    where = Path("<run folder>")
    cmd = commands(
        spec, None, where, shown if want is None else want, [local_node(where, ranks)], cpu=not gpus
    )[0]
    memory, err = memory_estimate(spec, ranks) if estimate_memory else (None, None)
    shown_env: dict[str, str] = {
        k: cmd.env[k] for k in ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME") if k in cmd.env
    }
    d = spec.distributed
    if d.nvme_path and d.offload in ("nvme", "auto"):
        free, problem = fit.nvme_check(d.nvme_path)
        checks.append(Check("nvme path", problem is None or d.offload == "auto",
                            problem or f"{d.nvme_path}: {(free or 0) / fit.GIB:.1f} GiB free"))  # fmt: skip
    if d.tensor_parallel > 1:
        checks.append(tp_check(spec, ranks, ranks, memory["shape"] if memory and "shape" in memory else None))
    if err is not None and not err.startswith("the estimate took"):  # the model cannot be built
        checks.append(Check("model", False, f"building the model from the spec failed: {err}"))
    plan = None
    if memory and "shape" in memory:
        plan = fit.plan_spec(spec, memory["shape"], ranks, ranks, fit.probe(d.nvme_path))
        checks.append(Check("fits", plan.chosen is not None, plan.reason))
        if plan.chosen is not None and _auto(spec):
            spec = fitted(spec, plan)
    return DryRun(spec, _ds_config(spec, memory), cmd.argv, ranks, checks, memory, err, shown_env, fit=plan)


def tp_check(spec: Spec, ranks: int, per_node: int, shape: dict[str, int] | None) -> Check:
    """Whether `ranks` (`per_node` on the smallest node) split into tensor-parallel groups
    of distributed.tensor_parallel, and the model's heads and hidden size split evenly; the
    detail shows the layout (data-parallel replicas x tensor-parallel ranks)."""
    tp = spec.distributed.tensor_parallel
    problems = []
    if per_node % tp:
        problems.append(
            f"{per_node} rank(s) per node do not split into groups of {tp} (a group stays on one node)"
        )
    for key, what in (("num_heads", "attention heads"), ("num_kv_heads", "key/value heads"),
                      ("hidden_size", "hidden size")):  # fmt: skip
        n = (shape or {}).get(key) or 0
        if n and n % tp:
            problems.append(f"the model's {what} ({n}) do not divide by {tp}")
    if problems:
        return Check("tensor parallel", False, "; ".join(problems) + ": change distributed.tensor_parallel")
    layout = f"{ranks} rank(s) = {ranks // tp} data-parallel x {tp} tensor-parallel"
    if shape:
        layout += (f"; per rank {shape['num_heads'] // tp} of {shape['num_heads']} heads, "
                   f"{shape['hidden_size'] // tp} of {shape['hidden_size']} hidden")  # fmt: skip
    return Check("tensor parallel", True, layout)


def check_tensor_parallel(spec: Spec, local: bool) -> None:
    """At launch: a tensor-parallel spec that cannot split raises UserError before anything.
    On a cluster the nodes' rank counts are the pre-flight's; here procs_per_node when fixed."""
    from .errors import UserError

    pp, tp = spec.distributed.procs_per_node, spec.distributed.tensor_parallel
    ranks = local_ranks(spec, gpu_count()) if local else (pp if isinstance(pp, int) else tp)
    memory, _ = memory_estimate(spec, ranks)
    c = tp_check(spec, ranks, ranks, memory["shape"] if memory and "shape" in memory else None)
    if not c.ok:
        raise UserError(f"distributed.tensor_parallel: {c.detail}")


def local_ranks(spec: Spec, gpus: int) -> int:
    """Ranks on this machine: procs_per_node, or auto: one per GPU (one CPU rank without)."""
    pp = spec.distributed.procs_per_node
    return pp if isinstance(pp, int) else (gpus or 1)


def _auto(spec: Spec) -> bool:
    return "auto" in (spec.distributed.zero_stage, spec.distributed.offload)


def fitted(spec: Spec, plan: Any) -> Spec:
    """`spec` with the ZeRO stage and offload the plan chose in place of its auto values."""
    c = plan.chosen
    return Spec.from_dict(
        spec.to_dict(), {"distributed.zero_stage": c.stage, "distributed.offload": c.offload}
    )


def fit_spec(spec: Spec) -> tuple[Spec, Any]:
    """For a launch: `spec` with its auto ZeRO stage/offload resolved against what the nodes
    have (this machine, the cgroup's limit included, or every node of an ssh cluster, asked
    over ssh), and the plan; `fit.DoesNotFit` when nothing fits, before anything is written or
    started."""
    from .cluster import resolve
    from .errors import UserError

    cluster = resolve(spec.distributed.nodes)
    if cluster is None:
        ranks = per_node = local_ranks(spec, gpu_count())
        res = fit.probe(spec.distributed.nvme_path)
    else:
        ranks, per_node, res = _cluster_resources(spec, cluster)
    memory, err = memory_estimate(spec, ranks)
    if memory is None:
        raise UserError(f"zero_stage/offload auto needs the model's size, and the estimate failed: {err}")
    plan = fit.plan_spec(spec, memory["shape"], ranks, per_node, res)
    if plan.chosen is None:
        raise fit.DoesNotFit(plan)
    return fitted(spec, plan), plan


def _cluster_resources(spec: Spec, cluster: Any) -> tuple[int, int, fit.Resources]:
    """Ranks, ranks per node and the tightest node's resources of an ssh cluster (its
    pre-flight, run now); Slurm's nodes are not known before the allocation."""
    from .errors import UserError
    from .launcher import remote
    from .launcher.probe import preflight

    if cluster.launcher == "slurm":
        raise UserError(
            "distributed.zero_stage/offload auto cannot see a Slurm allocation's nodes before it "
            "exists: give a ZeRO stage and an offload (the dry run estimates each)"
        )
    pp = spec.distributed.procs_per_node
    nodes = remote.plan_nodes(cluster, "<run id>", Path("<run folder>"), pp if isinstance(pp, int) else 0)
    pf = preflight(cluster, nodes, spec.distributed.master_port, **_nvme_checks(spec))
    if not pf.ok or not pf.resources:
        raise UserError("pre-flight failed: " + "; ".join(pf.problems or ["no node answered"]))
    slots = [n.slots or 1 for n in pf.nodes]
    return sum(slots), max(slots), fit.tightest(pf.resources)


def _nvme_checks(spec: Spec) -> dict[str, Any]:
    """The nodes' NVMe check: required under offload: nvme; under auto an unusable folder only
    rules NVMe out of the plan."""
    d = spec.distributed
    return {
        "nvme": d.nvme_path if d.offload in ("nvme", "auto") else None,
        "nvme_required": d.offload == "nvme",
    }


def _dry_run_cluster(spec: Spec, cluster: Any, estimate_memory: bool, probe: bool) -> DryRun:
    """The pre-flight on every node (ssh, host keys, versions, ranks, port, disk) and the
    command each node would run (or the sbatch script)."""
    from .launcher import remote, slurm
    from .launcher.backends import commands
    from .launcher.probe import preflight

    pp = spec.distributed.procs_per_node
    where = Path("<run folder>")
    port, cpu = spec.distributed.master_port or 29500, True
    resources = None
    if cluster.launcher == "slurm":
        nodes = slurm.plan(spec, cluster, where)
        checks = [Check("slurm", True, "the nodes are allocated by Slurm: no pre-flight before submission")]
    else:
        nodes = remote.plan_nodes(cluster, "<run id>", where, pp if isinstance(pp, int) else 0)
        checks = [Check("pre-flight", True, "not run yet (Dry run runs it)")]
        if probe:
            pf = preflight(cluster, nodes, spec.distributed.master_port, **_nvme_checks(spec))
            checks = [Check(name, ok, detail) for name, ok, detail in pf.checks]
            nodes, port, cpu = pf.nodes, pf.master_port or port, pf.cpu
            resources = fit.tightest(pf.resources) if pf.resources else None
        nodes = [remote.Node(n.index, n.host, n.run_dir, n.slots or 1) for n in nodes]
    cmds = commands(spec, cluster, where, port, nodes, cpu=cpu)
    ranks = sum(n.slots for n in nodes)
    memory, err = memory_estimate(spec, ranks) if estimate_memory else (None, None)
    if spec.distributed.tensor_parallel > 1:
        shape = memory["shape"] if memory and "shape" in memory else None
        checks.append(tp_check(spec, ranks, min(n.slots for n in nodes), shape))
    plan = None
    if memory and "shape" in memory and resources is not None:
        plan = fit.plan_spec(spec, memory["shape"], ranks, max(n.slots for n in nodes), resources)
        checks.append(Check("fits", plan.chosen is not None, plan.reason))
        if plan.chosen is not None and _auto(spec):
            spec = fitted(spec, plan)
    return DryRun(spec, _ds_config(spec, memory), cmds[0].argv, ranks, checks, memory, err, dict(cluster.env),
                  cmds, fit=plan)  # fmt: skip


def _ds_config(spec: Spec, memory: dict[str, Any] | None) -> dict[str, Any]:
    """The DeepSpeed config, with ZeRO-3's "auto" sizes as the worker will fill them (when the
    estimate knows the model's shape)."""
    cfg = deepspeed_config(spec)
    return resolve_auto(cfg, memory["shape"]) if memory and "shape" in memory else cfg


def _data_checks(spec: Spec) -> list[Check]:
    """What the data files alone tell: a training block longer than the whole training text
    can never be filled (a token is at least one character of text)."""
    d = spec.data
    files = [f for f in d.train if os.path.isfile(f) and f.endswith((".txt", ".md"))]
    if d.format != "text" or not files or len(files) != len(d.train):
        return []
    chars = sum(os.path.getsize(f) for f in files)
    room = int(chars * (1 - (d.val_fraction if d.validation is None else 0)))
    ok = d.block_size + 1 <= room
    return [Check("block vs data", ok, f"data.block_size {d.block_size} fits the training text (<= {room:,} tokens)"
                  if ok else f"data.block_size {d.block_size} is longer than the whole training text (at most "
                  f"{room:,} tokens); lower data.block_size or add data")]  # fmt: skip


def memory_estimate(spec: Spec, ranks: int) -> tuple[dict[str, Any] | None, str | None]:
    """Memory per rank for each ZeRO stage (DeepSpeed's estimators, in a subprocess), or why not."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / SPEC_FILE
        f.write_text(spec.to_yaml())
        try:
            out = subprocess.run(
                [sys.executable, "-m", "jupyter_llm.train.estimate", str(f), str(ranks)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, "the estimate took over 120 s"
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), None
