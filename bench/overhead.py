"""Overhead of jupyter_llm over a hand-written DeepSpeed loop, same model and data.

Both run the seed's tiny GPT (4 layers, 4 heads, 128 dims, block 64, batch 12) on Tiny
Shakespeare under DeepSpeed's launcher with world size 1 and 2 (CPU ranks here). Each
repetition runs baseline and jupyter_llm back to back, alternating which goes first;
steady-state tokens/s excludes start-up and the first `WARMUP` steps. Prints JSON with the
median ratio (jupyter_llm / baseline) per world size.

    python bench/overhead.py [--reps 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}
BLOCK, BATCH, WARMUP, LOG_EVERY = 64, 12, 20, 10


def spec(world: int, steps: int) -> dict:
    return {
        "name": f"bench-ws{world}",
        "seed": 1337,
        "model": {"config": {"model_type": "gpt2", **MODEL}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(CORPUS)], "block_size": BLOCK},
        "train": {"micro_batch_size": BATCH, "max_steps": steps, "log_every": LOG_EVERY, "eval_every": 0,
                  "save_every": 0},
        "optim": {"warmup_steps": 10},
        "distributed": {"procs_per_node": world, "zero_stage": 2},
    }  # fmt: skip


def run_ours(world: int, steps: int) -> float:
    import jupyter_llm

    run = jupyter_llm.launch(spec(world, steps))
    state = run.wait(1800)
    if state != "completed":
        sys.exit(f"jupyter_llm run {run.id} ended {state}: {run.status().get('error')}")
    windows = [m for m in run.metrics() if "tokens_per_s" in m and m["step"] > WARMUP]
    return statistics.median(m["tokens_per_s"] for m in windows)


def run_baseline(world: int, steps: int, tmp: Path) -> float:
    from jupyter_llm.launcher.local import build_command, free_port
    from jupyter_llm.spec import Spec, deepspeed_config

    cfg = tmp / f"ds{world}.json"
    cfg.write_text(json.dumps(deepspeed_config(Spec.from_dict(spec(world, steps)))))
    out = tmp / f"baseline{world}.json"
    port = free_port()
    # the same launcher and environment (threads per rank, gloo on loopback) as our runs
    _, env = build_command(tmp, world, port)
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
            str(HERE / "baseline_ds.py"), "--corpus", str(CORPUS), "--ds-config", str(cfg),
            "--steps", str(steps), "--warmup", str(WARMUP), "--block", str(BLOCK),
            "--layers", str(MODEL["n_layer"]), "--heads", str(MODEL["n_head"]), "--embd", str(MODEL["n_embd"]),
            "--out", str(out)]  # fmt: skip
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--worlds", default="1,2")
    args = ap.parse_args()
    from scale import warm_ops  # bench/scale.py: DeepSpeed's ops built before anything is timed

    warm_ops("ShareMemCommBuilder")  # the op a ZeRO-0/2 CPU run loads (Adam: torch's)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("JUPYTER_LLM_HOME", tmp)
        results = {}
        for world in (int(w) for w in args.worlds.split(",")):
            ours, base = [], []
            for rep in range(args.reps):
                order = ("base", "ours") if rep % 2 == 0 else ("ours", "base")
                for who in order:
                    if who == "base":
                        base.append(run_baseline(world, args.steps, Path(tmp)))
                    else:
                        ours.append(run_ours(world, args.steps))
            ratios = [o / b for o, b in zip(ours, base, strict=True)]
            results[f"world_size_{world}"] = {
                "jupyter_llm_tokens_per_s": ours,
                "baseline_tokens_per_s": base,
                "median_ratio": statistics.median(ratios),
                "ratios": ratios,
            }
    print(json.dumps({"benchmark": "overhead", "steps": args.steps, "warmup_steps": WARMUP,
                      "model": MODEL, "block": BLOCK, "batch": BATCH, "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
