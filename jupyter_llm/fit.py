"""A launch that fits itself: what a node has, what each ZeRO stage and offload needs, and the
cheapest configuration that fits (`distributed.zero_stage: auto`, `distributed.offload: auto`).

Pure Python and the standard library (no torch): the kernel, the CLI and the form plan here.
The model's shape comes from `jupyter_llm.train.estimate` (the meta device, in a subprocess).
The memory model is per rank, in bytes, by where the bytes live (the accelerator, the host,
the NVMe folder); on a node without GPUs the accelerator is the host. Its terms and constants
are checked against measured peaks (`mem_peak_mb`) in bench/scale.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

GIB = 2**30
# what one CPU rank holds before any model (python, torch, transformers, DeepSpeed and its
# ops, the data): a 2-layer model's peak here was 450-510 MiB
RUNTIME_CPU = 560 * 2**20
# on a GPU node: the CUDA context and kernels on the device, the same libraries on the host
RUNTIME_GPU_DEVICE = 600 * 2**20
RUNTIME_GPU_HOST = 1536 * 2**20
# per node, besides the ranks: the supervisor and DeepSpeed's launcher processes (measured
# here: an 85 M- and a 340 M-parameter rank fit their own estimate but not a cgroup without this)
NODE_OVERHEAD = 512 * 2**20
SAFETY = 0.9  # plan to fill at most this share of what a node reports free
# candidates from the least sharding and offload to the most (the first that fits is chosen)
CANDIDATES: tuple[tuple[int, str], ...] = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (3, "none"),
    (2, "optimizer"),
    (3, "optimizer"),
    (3, "optimizer+params"),
    (3, "nvme"),
)


# -- what a node has ------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one node offers a job: host memory (the cgroup's room where the job runs under a
    memory limit, as in containers and Slurm allocations), free memory per GPU, free space in
    the NVMe folder."""

    host_bytes: int
    host_source: str
    gpu_free: tuple[int, ...] = ()
    nvme_free: int | None = None
    nvme_problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"host_bytes": self.host_bytes, "host_source": self.host_source, "gpu_free": list(self.gpu_free),
                "nvme_free": self.nvme_free, "nvme_problem": self.nvme_problem}  # fmt: skip


def tightest(nodes: dict[str, dict[str, Any]]) -> Resources:
    """What every node of a job offers (`nodes`: a node's label -> its probed Resources dict):
    the least host memory, the least free memory of any GPU, the least NVMe space, each
    naming the node it comes from; the first NVMe problem found."""
    if not nodes:
        raise ValueError("no node answered the pre-flight")
    host_label, host = min(nodes.items(), key=lambda kv: kv[1]["host_bytes"])
    gpus = [g for r in nodes.values() for g in r["gpu_free"]]
    nvme = [r["nvme_free"] for r in nodes.values() if r.get("nvme_free") is not None]
    problem = next(
        (f"{label}: {r['nvme_problem']}" for label, r in nodes.items() if r.get("nvme_problem")), None
    )
    return Resources(
        host_bytes=host["host_bytes"],
        host_source=f"{host_label}: {host['host_source']}",
        gpu_free=(min(gpus),) if gpus else (),
        nvme_free=min(nvme) if nvme and len(nvme) == len(nodes) else None,
        nvme_problem=problem,
    )


def probe(nvme_path: str | None = None) -> Resources:
    """This machine's resources, as a job started from this process would see them."""
    avail = _meminfo("MemAvailable") or 0
    host, source = avail, "MemAvailable"
    limit = cgroup_room()
    if limit is not None and limit[0] < host:
        host, source = limit
    nvme_free, problem = (None, None) if not nvme_path else nvme_check(nvme_path)
    return Resources(host, source, gpu_free(), nvme_free, problem)


def cgroup_room() -> tuple[int, str] | None:
    """Bytes this process's memory cgroup still allows (limit - usage), and which cgroup;
    None where there is no limit (cgroup v1 and v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            limit, usage = _read_int(base, "memory.limit_in_bytes"), _read_int(base, "memory.usage_in_bytes")
            if limit is not None and limit < 2**60:
                return max(limit - (usage or 0), 0), f"cgroup {path} (limit {limit / GIB:.2f} GiB)"
        elif controllers == "":  # v2
            base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            limit, usage = _read_int(base, "memory.max"), _read_int(base, "memory.current")
            if limit is not None:
                return max(limit - (usage or 0), 0), f"cgroup {path} (limit {limit / GIB:.2f} GiB)"
    return None


def gpu_free() -> tuple[int, ...]:
    """Free bytes per GPU from nvidia-smi (no CUDA in this process); () without GPUs."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    # JUPYTER_LLM_GPU_MEMORY_FRACTION: the share of each GPU a job may use (the worker caps it)
    cap = float(os.environ.get("JUPYTER_LLM_GPU_MEMORY_FRACTION") or 1)
    rows = [line.split(",") for line in out.stdout.strip().splitlines() if line.strip()]
    from .devices import visible_gpus

    visible = visible_gpus(os.environ)  # only the GPUs CUDA_VISIBLE_DEVICES lets the job use
    rows = rows if visible is None else [rows[i] for i in visible if i < len(rows)]
    return tuple(int(min(float(free), cap * float(total))) * 2**20 for free, total in rows)


def nvme_check(path: str) -> tuple[int | None, str | None]:
    """Free bytes in `path`, or why it cannot hold swap files (missing, not writable, tmpfs)."""
    if not os.path.isdir(path):
        return None, f"{path} does not exist (create it on a local NVMe/SSD, or pick another folder)"
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".jupyter-llm-probe-"):
            pass
    except OSError as e:
        return None, f"{path} is not writable: {e.strerror}"
    fstype = _fstype(path)
    if fstype in ("tmpfs", "ramfs"):
        return None, f"{path} is on {fstype}: its files live in memory, so offloading there saves none"
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, None


def _fstype(path: str) -> str | None:
    """The filesystem type of the mount that holds `path` (the longest matching mount point)."""
    real, best, kind = os.path.realpath(path), "", None
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(folder: str, name: str) -> int | None:
    try:
        text = Path(folder, name).read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


# -- what a configuration needs ---------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """Bytes one rank needs, by where they live."""

    device: int  # the accelerator (the host itself on a CPU node)
    host: int  # host memory besides the device's (offloaded states, swap buffers)
    nvme: int  # swap files


@dataclass(frozen=True)
class Job:
    """What the memory model reads from a spec and the model's shape."""

    shape: dict[str, int]
    ranks: int  # data-parallel world size
    ranks_per_node: int
    compute_bytes: int  # 4 (fp32) or 2 (bf16/fp16)
    micro_batch: int
    block: int
    vocab: int
    heads: int
    checkpointing: bool
    zero3: dict[str, int]  # zero3_settings (the live-parameter limit, the swap buffers)


def need(job: Job, stage: int, offload: str, cuda: bool) -> Need:
    """Per-rank bytes for ZeRO `stage` with `offload` (model states after the ZeRO paper's
    accounting; activations after Korthikanti et al. 2022, without sequence parallelism)."""
    s, n, c = job.shape, max(job.ranks, 1), job.compute_bytes
    p, t = s["params"], s["trainable_params"]
    # weights: whole below stage 3; a shard plus the gathered live layers at stage 3
    live = min(p, job.zero3["stage3_max_live_parameters"])
    weights = p * c if stage < 3 else p * c // n + live * c
    grads = t * c if stage < 2 else t * c // n
    # Adam's m and v, and DeepSpeed's fp32 partition of the weights (also when training in
    # fp32) and of the gradients; plain torch Adam at stage 0 keeps no extra copy in fp32
    optim = (8 * t + (4 * t if c == 2 else 0)) if stage == 0 else 16 * t // n
    runtime = RUNTIME_GPU_DEVICE if cuda else RUNTIME_CPU
    dev, host, disk = weights + grads + optim + activations(job) + runtime, 0, 0
    if offload in ("optimizer", "optimizer+params"):
        dev, host = dev - optim, host + optim
    if offload == "optimizer+params":
        dev, host = dev - p * c // n, host + p * c // n
    if offload == "nvme":
        # the optimizer's states and the weights' shards in files; staged through buffers
        z = job.zero3
        buffers = 4 * z["sub_group_size"] * 4 + z["param_buffer_count"] * z["param_buffer_size"] * c
        # what stays in memory: the fp32 gradient partition (gradients are reduced into it as
        # they are made, so there is no separate gradient term) and the gathered live layers
        dev -= grads + optim - 4 * t // n + p * c // n
        host, disk = host + buffers, optim - 4 * t // n + p * c // n
    if cuda:
        host += RUNTIME_GPU_HOST
    return Need(max(dev, 0), host, disk)


def activations(job: Job) -> int:
    """Activation memory of one micro batch, and the logits (with their fp32 loss copy)."""
    s, c = job.shape, job.compute_bytes
    b, seq, h, layers = job.micro_batch, job.block, max(s["hidden_size"], 1), max(s["num_layers"], 1)
    per_layer = b * seq * h * (34 + 5 * job.heads * seq / h) * c / 2
    acts = (b * seq * h * c * layers + per_layer) if job.checkpointing else per_layer * layers
    logits = b * seq * job.vocab * (c + 8)
    return int(acts + logits)


# -- the choice -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    stage: int
    offload: str
    need: Need
    fits: bool
    why: str  # what does not fit, or "fits"


@dataclass(frozen=True)
class Plan:
    candidates: list[Candidate]
    chosen: Candidate | None
    resources: Resources
    reason: str
    suggestions: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return [{"zero_stage": c.stage, "offload": c.offload, "device_gib": c.need.device / GIB,
                 "host_gib": c.need.host / GIB, "nvme_gib": c.need.nvme / GIB, "fits": c.fits, "why": c.why,
                 "chosen": c is self.chosen} for c in self.candidates]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.rows(), "resources": self.resources.to_dict(), "reason": self.reason,
                "suggestions": self.suggestions,
                "chosen": None if self.chosen is None else
                {"zero_stage": self.chosen.stage, "offload": self.chosen.offload}}  # fmt: skip

    def table(self) -> str:
        lines = [f"{'stage':>5} {'offload':<17} {'device GiB':>10} {'host GiB':>9} {'nvme GiB':>9}  fits"]
        for r in self.rows():
            mark = " <- chosen" if r["chosen"] else ""
            lines.append(f"{r['zero_stage']:>5} {r['offload']:<17} {r['device_gib']:>10.2f} {r['host_gib']:>9.2f} "
                         f"{r['nvme_gib']:>9.2f}  {r['why']}{mark}")  # fmt: skip
        return "\n".join(lines)


class DoesNotFit(UserError):
    """No ZeRO stage and offload the spec allows fits what the nodes have."""

    def __init__(self, plan: Plan):
        self.plan = plan
        tips = "; ".join(plan.suggestions) or "a machine with more memory"
        super().__init__(f"the model does not fit: {plan.reason}. Would fit: {tips}.\n{plan.table()}")


def candidates_for(zero_stage: int | str, offload: str, nvme: bool) -> list[tuple[int, str]]:
    """The (stage, offload) pairs a spec allows: auto values range, fixed values stay."""
    out = []
    for stage, off in CANDIDATES:
        if zero_stage != "auto" and stage != zero_stage:
            continue
        if offload != "auto" and off != offload:
            continue
        if off == "nvme" and not nvme:
            continue
        out.append((stage, off))
    if zero_stage != "auto" and offload != "auto" and not out:
        out = [(int(zero_stage), offload)]
    return out


def judge(job: Job, res: Resources, stage: int, offload: str) -> Candidate:
    cuda = bool(res.gpu_free)
    nd = need(job, stage, offload, cuda)
    per_node_host = (nd.host + (0 if cuda else nd.device)) * job.ranks_per_node + NODE_OVERHEAD
    short = []
    if cuda and nd.device > SAFETY * min(res.gpu_free):
        short.append(f"GPU {nd.device / GIB:.2f} > {SAFETY * min(res.gpu_free) / GIB:.2f} GiB free")
    if per_node_host > SAFETY * res.host_bytes:
        short.append(
            f"host {per_node_host / GIB:.2f} > {SAFETY * res.host_bytes / GIB:.2f} GiB ({res.host_source})"
        )
    if offload == "nvme":
        if res.nvme_problem:
            short.append(res.nvme_problem)
        elif res.nvme_free is not None and nd.nvme * job.ranks_per_node > SAFETY * res.nvme_free:
            short.append(
                f"nvme {nd.nvme * job.ranks_per_node / GIB:.2f} > {SAFETY * res.nvme_free / GIB:.2f} GiB free"
            )
    return Candidate(stage, offload, nd, not short, "; ".join(short) or "fits")


def choose(job: Job, res: Resources, zero_stage: int | str, offload: str, nvme: bool,
           hints: dict[str, Job] | None = None) -> Plan:  # fmt: skip
    """The first candidate that fits; else the plan says by how much the closest one misses
    and which changes (`hints`: a name -> the job with that change) would fit."""
    cands = [judge(job, res, s, o) for s, o in candidates_for(zero_stage, offload, nvme)]
    chosen = next((c for c in cands if c.fits), None)
    if chosen is not None:
        cheaper = [c for c in cands if c is not chosen and cands.index(c) < cands.index(chosen)]
        reason = (f"ZeRO-{chosen.stage} with offload {chosen.offload} is the least sharding and offload that fits"
                  + (f" ({len(cheaper)} cheaper candidate(s) do not)" if cheaper else ""))  # fmt: skip
        return Plan(cands, chosen, res, reason)
    cuda = bool(res.gpu_free)

    def missing(c: Candidate) -> float:
        used = (c.need.host + (0 if cuda else c.need.device)) * job.ranks_per_node + NODE_OVERHEAD
        host = used - SAFETY * res.host_bytes
        dev = c.need.device - SAFETY * min(res.gpu_free) if cuda else 0
        return max(host, dev, 0)

    best = min(cands, key=missing) if cands else None
    reason = "no candidate" if best is None else (
        f"the closest, ZeRO-{best.stage} with offload {best.offload}, misses {missing(best) / GIB:.2f} GiB "
        f"({best.why})")  # fmt: skip
    tips = []
    for name, alt in (hints or {}).items():
        alt_plan = choose(alt, res, "auto", "auto", nvme)
        if alt_plan.chosen is not None:
            tips.append(f"{name} (ZeRO-{alt_plan.chosen.stage}, offload {alt_plan.chosen.offload})")
    if not nvme and offload in ("auto", "nvme"):
        tips.append("offload: nvme with distributed.nvme_path on a local SSD (ZeRO-Infinity)")
    return Plan(cands, None, res, reason, tips)


# -- from a spec ------------------------------------------------------------------------------


def job_for(spec: Any, shape: dict[str, int], ranks: int, ranks_per_node: int) -> Job:
    """The memory model's view of a spec (`spec`: a Spec) and its model's shape."""
    from .spec import zero3_settings

    prec = spec.precision()
    tp = spec.distributed.tensor_parallel
    if tp > 1:  # a rank holds 1/tp of every split weight; the replicas are ranks/tp
        split = (
            "params",
            "trainable_params",
            "largest_param",
            "largest_module_params",
            "largest_layer_params",
        )
        shape = {**shape, **{k: -(-shape[k] // tp) for k in split if k in shape}}
        ranks = max(ranks // tp, 1)
    return Job(shape=shape, ranks=ranks, ranks_per_node=ranks_per_node, compute_bytes=4 if prec == "fp32" else 2,
               micro_batch=spec.train.micro_batch_size, block=spec.data.block_size,
               vocab=max(shape.get("vocab_size", 0), 1), heads=max(shape.get("num_heads", 0), 1),
               checkpointing=spec.model.gradient_checkpointing, zero3=zero3_settings(shape))  # fmt: skip


def plan_spec(spec: Any, shape: dict[str, int], ranks: int, ranks_per_node: int, res: Resources) -> Plan:
    """The plan for a spec on nodes with `res`: its auto values range, its fixed ones stay.
    When nothing fits, the changes that would are tried: LoRA, a shorter block, a smaller
    micro batch, twice the ranks."""
    import dataclasses

    d = spec.distributed
    job = job_for(spec, shape, ranks, ranks_per_node)
    hints: dict[str, Job] = {}
    if spec.model.pretrained and not spec.model.lora:
        lora = {**shape, "trainable_params": max(shape["params"] // 200, 1)}  # r=8 adapters: ~0.5 %
        hints["model.lora (r=8)"] = dataclasses.replace(job, shape=lora)
    if spec.data.block_size > 64:
        hints[f"data.block_size: {spec.data.block_size // 2}"] = dataclasses.replace(
            job, block=job.block // 2
        )
    if job.micro_batch > 1:
        hints[f"train.micro_batch_size: {job.micro_batch // 2}"] = dataclasses.replace(
            job, micro_batch=job.micro_batch // 2
        )
    hints[f"{2 * ranks} ranks (more nodes)"] = dataclasses.replace(job, ranks=2 * ranks)
    nvme = bool(d.nvme_path) and res.nvme_problem is None
    return choose(job, res, d.zero_stage, d.offload, nvme, hints)
