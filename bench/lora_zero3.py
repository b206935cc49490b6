"""A LoRA fine-tune of a model under ZeRO-3 on 2 CPU ranks: how much memory each rank really
holds, against the model's size and against the estimate the dry run showed.

`python bench/lora_zero3.py` builds a GPT-2-shaped model from a config (1024 wide, 38 layers:
478 M parameters, 1.9 GB in fp32), saves it with `save_pretrained` (one safetensors file, the
default), and fine-tunes it with LoRA (r=8 on `c_attn`) under `zero_stage: 3`, 2 ranks. The
runtime's own footprint is the same run on a 2-layer model of the same width. Prints JSON:
each rank's peak (`VmHWM` at its log steps, from `mem_peak_mb_ranks`), the bound the issue sets
(0.6 x the model's fp32 bytes + the footprint), the dry run's estimate and its error, and the
peak of the export (the whole run's cgroup high-water mark, page cache included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
MB = 2**20


def save_base(folder: Path, layers: int, embd: int, heads: int) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.data import build_tokenizer

    tok = build_tokenizer(Spec.from_dict({"data": {"train": str(CORPUS)}}), folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=embd, n_positions=256, vocab_size=len(tok),
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    return n


def spec_for(base: Path, args: argparse.Namespace) -> dict:
    return {
        "name": "lora-zero3",
        "model": {"task": "causal-lm", "pretrained": str(base),
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}},
        "data": {"train": [str(CORPUS)], "block_size": args.block, "val_fraction": 0},
        "train": {"micro_batch_size": args.micro_batch, "max_steps": args.steps, "log_every": 1, "eval_every": 0,
                  "save_every": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "distributed": {"procs_per_node": 2, "zero_stage": 3},
    }  # fmt: skip


def one(layers: int, args: argparse.Namespace, work: Path) -> dict:
    import cgroup

    from jupyter_llm import launch
    from jupyter_llm.preflight import dry_run
    from jupyter_llm.spec import Spec

    base = work / f"base-{layers}"
    params = save_base(base, layers, args.embd, args.heads)
    spec = Spec.from_dict(spec_for(base, args))
    plan = dry_run(spec).fit
    need = plan.chosen.need if plan and plan.chosen else None
    estimate = (need.device + need.host) if need else None  # a CPU rank: both are host memory
    # an unconfined group (no limit) only to read the whole job's high-water mark
    with cgroup.memory_limit(f"jllm-lora-{os.getpid()}-{layers}", 2**62) as group:
        cgroup.enter(group)  # the supervisor started here, and the ranks it starts, stay inside
        t0 = time.time()
        try:
            run = launch(spec)
        finally:
            cgroup.leave()  # before the group's removal, which kills what is left inside
        run.wait(args.timeout)
        wall = time.time() - t0
        job_peak = cgroup.peak(group)
    steps = [m for m in run.metrics() if "loss" in m]
    ranks = [max(m["mem_peak_mb_ranks"][r] for m in steps) for r in range(2)] if steps else []
    return {
        "layers": layers,
        "params": params,
        "fp32_mb": round(params * 4 / MB),
        "state": run.state,
        "losses": [round(m["loss"], 4) for m in steps],
        "rank_peak_mb": ranks,
        "estimate_mb": round(estimate / MB) if estimate else None,
        "job_peak_with_export_mb": round(job_peak / MB),
        "wall_s": round(wall, 1),
        "step_time_s": sorted(round(m["step_time_s"], 2) for m in steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=38)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "lora_zero3.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from scale import warm_ops  # bench/scale.py

    warm_ops()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.environ["JUPYTER_LLM_HOME"] = str(Path(tmp) / "home")
        small = one(2, args, Path(tmp))
        print(json.dumps(small), file=sys.stderr, flush=True)
        big = one(args.layers, args, Path(tmp))
        print(json.dumps(big), file=sys.stderr, flush=True)
    footprint = max(small["rank_peak_mb"] or [0])
    bound = 0.6 * big["fp32_mb"] + footprint
    peak = max(big["rank_peak_mb"] or [0])
    result = {
        "footprint_mb": footprint,
        "bound_mb": round(bound),
        "peak_mb": peak,
        "peak_within_bound": bool(big["rank_peak_mb"]) and peak <= bound,
        "estimate_error": round(big["estimate_mb"] / peak - 1, 3) if peak and big["estimate_mb"] else None,
        "small": small,
        "big": big,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
