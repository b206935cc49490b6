"""Cost of running on nodes over ssh versus on this machine, same spec and ranks.

Two loopback "nodes" (a real sshd on 127.0.0.2 and 127.0.0.3, `tests/sshd.py`; root, with
openssh-server and rsync installed: `make nodes`) with separate work folders, so the run folder
and prepared data travel with rsync and the metrics come back while the job runs. Each
repetition runs the same 2-rank ZeRO-2 spec locally (2 CPU ranks) and as 2 nodes × 1 rank,
alternating which goes first, and reports medians:

- launch → first metrics line seen in the local run folder, and launch → completed (s);
- sync lag: for every metrics line, the time it appeared in the local file minus the time the
  node wrote it (the line's own `time`), polled every 20 ms;
- steady tokens/s of both.

    python bench/remote.py [--reps 3] [--steps 200] [--sync-every 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"


def spec(nodes: Any, steps: int) -> dict[str, Any]:
    return {
        "name": "bench-remote",
        "seed": 7,
        "model": {"config": {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(CORPUS)], "block_size": 64},
        "train": {"micro_batch_size": 12, "max_steps": steps, "log_every": 10, "eval_every": 0, "save_every": 0},
        "optim": {"warmup_steps": 10},
        "distributed": {"nodes": nodes, "procs_per_node": 2 if nodes == 1 else 1, "zero_stage": 2},
    }  # fmt: skip


def one(nodes: Any, steps: int) -> dict[str, Any]:
    import jupyter_llm

    t0 = time.time()
    run = jupyter_llm.launch(spec(nodes, steps))
    path = run.path / "metrics.jsonl"
    seen: dict[int, float] = {}
    first = None
    while run.state not in ("completed", "failed", "stopped", "lost"):
        now = time.time()
        if path.exists():
            for line in path.read_text().splitlines():
                m = json.loads(line)
                if "loss" in m and m["step"] not in seen:
                    seen[m["step"]] = now
                    first = first or now
        time.sleep(0.02)
    if run.state != "completed":
        sys.exit(f"run {run.id} ended {run.state}: {run.status().get('error')}")
    total = time.time() - t0
    rows = [m for m in run.metrics() if "loss" in m]
    lags = [seen[m["step"]] - m["time"] for m in rows if m["step"] in seen]
    tps = statistics.median(m["tokens_per_s"] for m in rows if m["step"] > 20)
    return {"first_metric_s": (first or t0) - t0, "total_s": total, "lag_s": statistics.median(lags) if lags else None,
            "tokens_per_s": tps}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync-every", type=float, default=1.0)
    args = ap.parse_args()
    from sshd import start_sshd

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_LLM_HOME"] = tmp
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        sshd = start_sshd(Path(tmp) / "sshd")
        try:
            cluster = sshd.cluster(sync_every_s=args.sync_every)
            # both "nodes" share this machine's cores: give each rank its share, as the local run does
            cluster["env"]["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
            results: dict[str, list[dict[str, Any]]] = {"local": [], "nodes": []}
            for rep in range(args.reps):
                order = ["local", "nodes"] if rep % 2 == 0 else ["nodes", "local"]
                for which in order:
                    results[which].append(one(1 if which == "local" else cluster, args.steps))
        finally:
            sshd.stop()

    def med(which: str, key: str) -> float:
        return round(statistics.median(r[key] for r in results[which] if r[key] is not None), 3)

    out = {
        "reps": args.reps, "steps": args.steps, "sync_every_s": args.sync_every, "cpus": os.cpu_count(),
        **{f"{w}_{k}": med(w, k) for w in ("local", "nodes") for k in ("first_metric_s", "total_s", "tokens_per_s")},
        "nodes_sync_lag_s": med("nodes", "lag_s"),
        "local_file_lag_s": med("local", "lag_s"),
    }  # fmt: skip
    out["total_ratio"] = round(out["nodes_total_s"] / out["local_total_s"], 3)
    out["tokens_per_s_ratio"] = round(out["nodes_tokens_per_s"] / out["local_tokens_per_s"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
