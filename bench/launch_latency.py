"""Latency of the notebook path, in a real IPython kernel.

1. `%%llm_train` cell latency: p50/p95 of the time until the cell's reply (goal <= 0.3 s).
2. Time to the first training step, jupyter_llm vs a bare `deepspeed baseline_ds.py` with the
   same model and world size (goal ratio <= 1.1). Each side is timed from its process start
   to the end of its first optimizer step; medians of interleaved repetitions.
3. Cell latency while a job runs and its live view redraws: p95 of trivial cells (goal <= 50 ms).

    python bench/launch_latency.py [--launches 10] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from jupyter_client.manager import KernelManager

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}


def spec(name: str, steps: int, world: int = 2, grace: float = 120) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"config": {"model_type": "gpt2", **MODEL}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(CORPUS)], "block_size": 64},
        "train": {"micro_batch_size": 12, "max_steps": steps, "log_every": 1, "eval_every": 0, "save_every": 0,
                  "stop_grace_s": grace},
        "distributed": {"procs_per_node": world, "zero_stage": 2},
    }  # fmt: skip


def execute(kc: Any, code: str) -> float:
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        reply = kc.get_shell_msg(timeout=300)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    elapsed = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        sys.exit(f"cell failed: {code[:60]}...: {reply['content']}")
    return elapsed


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def first_step_ours(world: int) -> float:
    import jupyter_llm

    t0 = time.time()
    run = jupyter_llm.launch(spec(f"first-step-{world}", 3, world))
    run.wait(600)
    first = next(m for m in run.metrics() if "loss" in m)
    return float(first["time"] - t0)


def first_step_baseline(world: int, tmp: Path) -> float:
    from jupyter_llm.launcher.local import build_command, free_port
    from jupyter_llm.spec import Spec, deepspeed_config

    cfg = tmp / "ds.json"
    cfg.write_text(json.dumps(deepspeed_config(Spec.from_dict(spec("b", 3, world)))))
    mark = tmp / "first_step"
    mark.unlink(missing_ok=True)
    port = free_port()
    _, env = build_command(tmp, world, port)
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "--no_local_rank", str(HERE / "baseline_ds.py"),
            "--corpus", str(CORPUS), "--ds-config", str(cfg), "--steps", "3", "--warmup", "1", "--block", "64",
            "--layers", str(MODEL["n_layer"]), "--heads", str(MODEL["n_head"]), "--embd", str(MODEL["n_embd"]),
            "--out", str(tmp / "o.json"), "--first-step-file", str(mark)]  # fmt: skip
    t0 = time.time()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(mark.read_text()) - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", type=int, default=100)
    ap.add_argument("--skip-first-step", action="store_true", help="only the kernel-side measurements")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="jupyter-llm-bench-")
    os.environ["JUPYTER_LLM_HOME"] = home
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=dict(os.environ), cwd=home)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        execute(kc, "%load_ext jupyter_llm")
        # 1. launch latency; each job is stopped at once (grace 0: straight to signals)
        launch_s = []
        execute(kc, "import jupyter_llm")
        for i in range(args.launches):
            body = yaml.safe_dump(spec(f"lat{i}", 1000, 1, grace=0))
            launch_s.append(execute(kc, f"%%llm_train\n{body}"))
            execute(kc, "%llm_stop")
            # let the stopped job finish tearing down: the next launch should not compete with it
            execute(kc, "jupyter_llm.get_run().wait(120)")
        # 3. cell latency while a run trains and its live view redraws every second
        execute(kc, "%%llm_train busy\n" + yaml.safe_dump(spec("busy", 400, 2)))
        execute(kc, "import time; r = %llm_attach busy\nwhile r.state != 'running': time.sleep(0.2)")
        time.sleep(5)
        cells = []
        for _ in range(args.cells):
            cells.append(execute(kc, "1 + 1"))
            time.sleep(0.05)
        execute(kc, "assert r.state == 'running'")  # the cells were timed against a live job
        execute(kc, "%llm_stop busy")
        execute(kc, "r.wait(300)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    # 2. time to first step, interleaved
    ours: list[float] = []
    base: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(0 if args.skip_first_step else args.reps):
            for who in ("base", "ours") if rep % 2 == 0 else ("ours", "base"):
                if who == "base":
                    base.append(first_step_baseline(2, Path(tmp)))
                else:
                    ours.append(first_step_ours(2))
    print(json.dumps({
        "benchmark": "launch_latency",
        "llm_train_cell_s": {"p50": pct(launch_s, 0.5), "p95": pct(launch_s, 0.95), "all": launch_s},
        "first_step_s": {"jupyter_llm": ours, "baseline": base,
                         "median_ratio": statistics.median(ours) / statistics.median(base) if ours else None},
        "cell_latency_while_running_s": {"p50": pct(cells, 0.5), "p95": pct(cells, 0.95), "max": max(cells)},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
