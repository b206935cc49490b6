"""GPT-2 124M in bf16 on one GPU through jupyter_llm: tokens/s and MFU as JSON.

Needs a CUDA GPU (run it on a lent device machine); the peak FLOP/s comes from the
device name (H100/H200: 989 TFLOP/s dense bf16). Goal: MFU >= 0.5 on H100/H200.

    python bench/gpu_mfu.py [--steps 80] [--micro-batch 16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="train.compile: true")
    args = ap.parse_args()
    import os

    import jupyter_llm

    os.environ.setdefault("JUPYTER_LLM_HOME", tempfile.mkdtemp())
    spec = {
        "name": "gpt2-124m-mfu",
        "model": {
            "dtype": "bf16",
            # GPT-2 small; vocab padded to a multiple of 64 as nanoGPT does (50257 -> 50304)
            "config": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304,
                       "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        },
        "tokenizer": {"train": {"kind": "bpe", "vocab_size": 50304}},
        "data": {"train": [str(CORPUS)], "block_size": args.block, "val_fraction": 0.0},
        "train": {"micro_batch_size": args.micro_batch, "max_steps": args.steps, "log_every": 10,
                  "eval_every": 0, "save_every": 0, "compile": args.compile},
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 10},
        "distributed": {"procs_per_node": 1, "zero_stage": args.zero},
    }  # fmt: skip
    run = jupyter_llm.launch(spec)
    state = run.wait(3600)
    if state != "completed":
        print("\n".join(run.log_tail(40, rank=0)), file=sys.stderr)
        sys.exit(f"run ended {state}: {run.status().get('error')}")
    windows = [m for m in run.metrics() if "tokens_per_s" in m and m["step"] > 20]
    print(json.dumps({
        "benchmark": "gpu_mfu",
        "run": run.id,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in windows),
        "mfu": statistics.median(m["mfu"] for m in windows) if windows[0]["mfu"] is not None else None,
        "peak_flops": windows[0]["peak_flops"],
        "mem_mb": max(m["mem_mb"] for m in windows),
        "micro_batch": args.micro_batch, "block": args.block, "zero_stage": args.zero,
        "compile": args.compile,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
