"""A model whose training state is bigger than the machine: `python bench/scale.py`.

A job confined by a cgroup v1 memory limit (`--limit-gib`) trains a GPT-2-shaped model whose
fp32 training state (16 bytes per parameter: weights, gradients, Adam's m and v) is at least
twice that limit, launched with `zero_stage: 3, offload: auto`: the launch must itself find
that only NVMe offload fits (ZeRO-Infinity), and the loss must fall. Beside it, in the same
invocation and under the same limit, the largest model of the same width that completes a few
steps through Hugging Face's DeepSpeed integration at DeepSpeed's default ZeRO-3 settings
(bench/hf_zero3.py): depths doubled from 4, then bisected; a try that has not finished
after `--baseline-timeout` s counts as not completing. Prints JSON: both sizes, their ratio, the
step time, the peaks (the rank's VmHWM, the cgroup's), the estimate the launch used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import cgroup  # noqa: E402

CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
GIB = 2**30


def warm_ops(
    names: str = "AsyncIOBuilder CPUAdamBuilder FusedAdamBuilder PinMemoryBuilder ShareMemCommBuilder",
) -> None:
    """Build (or load) DeepSpeed's JIT ops outside any limit: a compiler inside the job's
    cgroup is OOM-killed long before the job itself would be. With the venv's ninja first on
    PATH, as the ranks have it (jupyter_llm/launcher/local.py): the system's older ninja and
    the venv's read each other's build log as outdated and rebuild every object."""
    code = f"import deepspeed.ops.op_builder.cpu as c\nfor n in {names.split()!r}: getattr(c, n)().load()"
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ, "PATH": path}
    )


def gpt2_params(layers: int, embd: int, vocab: int, block: int) -> int:
    return layers * (12 * embd * embd + 13 * embd) + vocab * embd + block * embd + 2 * embd


def ours(limit: int, layers: int, embd: int, heads: int, steps: int, work: Path) -> dict:
    # four 32-token blocks, all of them in every step (4 micro steps of 1): each step's loss is
    # the loss on the same text, so a handful of steps shows whether it falls (fresh 32-token
    # blocks per step gave losses that wander by +-0.5 whatever the model does)
    text = work / "four-blocks.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:128], encoding="utf-8")
    spec = {
        "name": "scale",
        # dropout off: each step's loss is then a function of the weights alone (GPT-2's 0.1
        # dropout moved it by as much as a step did)
        "model": {"config": {"model_type": "gpt2", "n_layer": layers, "n_head": heads, "n_embd": embd,
                             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(text)], "block_size": 32, "val_fraction": 0},
        # a small step on a deep model from scratch: Adam's first steps move every weight by
        # about lr, and at 95 layers 3e-5 overshot (3.56, 4.32, 4.82, 4.66, 3.92, 3.53, the same
        # to 4 decimals without offload, unconfined: it is the optimizer, not the offload);
        # 3e-6 falls from the first step. No warmup (its first step is at lr 0)
        "train": {"micro_batch_size": 1, "grad_accum": 4, "max_steps": steps, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                  "save_every": 0},
        "optim": {"lr": 3e-6, "warmup_steps": 0, "min_lr": 3e-6, "scheduler": "constant"},
        "distributed": {"procs_per_node": 1, "zero_stage": 3, "offload": "auto", "nvme_path": str(work / "nvme")},
    }  # fmt: skip
    (work / "nvme").mkdir(exist_ok=True)
    f = work / "scale.yaml"
    f.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "JUPYTER_LLM_HOME": str(work / "home")}
    with cgroup.memory_limit(f"jllm-scale-{os.getpid()}", limit) as group:
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "train", str(f), "--wait"], env=env,
                             capture_output=True, text=True, preexec_fn=lambda: cgroup.enter(group))  # fmt: skip
        wall, kills, cg_peak = time.time() - t0, cgroup.oom_kills(group), cgroup.peak(group)
    runs = sorted((work / "home" / "runs").glob("*-scale-*"))
    if not runs:
        return {"ok": False, "stdout": out.stdout[-2000:], "stderr": out.stderr[-2000:]}
    run = runs[-1]
    if not (run / "metrics.jsonl").is_file():  # ended before its first step
        status = json.loads((run / "status.json").read_text())
        return {"ok": False, "state": status["state"], "error": status.get("error"), "oom_kills": kills,
                "log": (run / "logs" / "rank0.log").read_text()[-2000:] if (run / "logs" / "rank0.log").is_file() else ""}  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_ = [m for m in metrics if "loss" in m]
    plan = json.loads((run / "fit.json").read_text())
    chosen = next(c for c in plan["candidates"] if c["chosen"])
    status = json.loads((run / "status.json").read_text())
    return {
        "ok": status["state"] == "completed" and kills == 0,
        "state": status["state"],
        "error": status.get("error"),
        "params": gpt2_params(layers, embd, 70, 32),
        "chosen": plan["chosen"],
        "estimate_gib": chosen["device_gib"] + chosen["host_gib"],
        "losses": [round(m["loss"], 4) for m in steps_],
        "first_half_mean_loss": _mean([m["loss"] for m in steps_[: len(steps_) // 2]]),
        "second_half_mean_loss": _mean([m["loss"] for m in steps_[len(steps_) // 2 :]]),
        "step_time_s": [round(m["step_time_s"], 2) for m in steps_],
        "vmhwm_gib": max(m["mem_peak_mb"] for m in steps_) / 1024 if steps_ else None,
        "cgroup_peak_gib": cg_peak / GIB,
        "oom_kills": kills,
        "wall_s": round(wall, 1),
        "export_loads": (run / "final" / "model.safetensors.index.json").is_file(),
    }


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def baseline(limit: int, layers: int, embd: int, heads: int, steps: int, timeout: float) -> dict:
    """One try of bench/hf_zero3.py under the limit: completed, killed, or still not done after
    `timeout` s (a job at its limit thrashes its page cache for many minutes before the OOM kill)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29700 + layers)}  # fmt: skip
    with cgroup.memory_limit(f"jllm-hf-{os.getpid()}", limit) as group:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, str(HERE / "hf_zero3.py"), "--layers", str(layers), "--embd", str(embd),
                                 "--heads", str(heads), "--block", "32", "--steps", str(steps), "--corpus", str(CORPUS)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: cgroup.enter(group))  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None  # the cgroup's removal kills it
        kills, peak = cgroup.oom_kills(group), cgroup.peak(group)
    return {"layers": layers, "params": gpt2_params(layers, embd, 70, 32), "ok": rc == 0 and kills == 0,
            "timed_out": rc is None, "oom_kills": kills, "cgroup_peak_gib": peak / GIB,
            "wall_s": round(time.time() - t0, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-gib", type=float, default=5.0)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--baseline-timeout", type=float, default=240, help="s before a baseline try counts as failed"
    )
    ap.add_argument("--out", default=str(HERE / "scale.json"))
    args = ap.parse_args()
    if not cgroup.available():
        sys.exit("needs a writable cgroup v1 memory controller (root)")
    limit = int(args.limit_gib * GIB)
    warm_ops()
    layers = 1
    while 16 * gpt2_params(layers, args.embd, 70, 32) < 2 * limit:  # training state >= 2x the limit
        layers += 1
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        mine = ours(limit, layers, args.embd, args.heads, args.steps, Path(tmp))
    print(json.dumps(mine), file=sys.stderr, flush=True)
    tries: list[dict] = []

    def completes(depth: int) -> bool:
        tries.append(baseline(limit, depth, args.embd, args.heads, args.steps, args.baseline_timeout))
        print(json.dumps(tries[-1]), file=sys.stderr, flush=True)
        return bool(tries[-1]["ok"])

    # the largest depth that completes: doubling from 4 layers (a failed try can take minutes,
    # so start small), then bisection between the last that completed and the first that did not
    lo, probe = 0, 4
    while probe <= layers and completes(probe):
        lo, probe = probe, 2 * probe
    hi = min(probe - 1, layers)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if completes(mid) else (lo, mid - 1)
    best = max((t for t in tries if t["ok"]), key=lambda t: t["layers"], default=None)
    result = {
        "limit_gib": args.limit_gib,
        "ours": mine,
        "ours_state_over_limit": 16 * mine.get("params", 0) / limit,
        "hf_default_zero3_largest": best,
        "hf_tries": tries,
        "ratio": (mine["params"] / best["params"]) if best and mine.get("ok") else None,
        "argv": sys.argv[1:],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
