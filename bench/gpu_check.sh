#!/usr/bin/env bash
# The GPU check (<= 10 min on one H200): run once whenever a device machine is lent
# (`run` tool, from the repository root; the project passes its tests without it).
#   1. GPT-2 124M, bf16, ZeRO-1, compiled (train.compile): tokens/s and MFU (bench/gpu_mfu.py)
#   2. ZeRO-3 + offload: a model whose fp32 weights exceed the GPU memory the job may use
#      (capped with PYTORCH_CUDA_ALLOC_CONF-independent torch.cuda.set_per_process_memory_fraction
#      through JUPYTER_LLM_GPU_MEMORY_FRACTION), chosen by `offload: auto`; peak device memory
#      (mem_peak_mb) against the launch's estimate (fit.json)
# Figures go to $OUT/gpu_check.json. Wheels the image lacks (deepspeed, pydantic, ...) are
# carried in .whl/ (see ../shared/BUILD-NOTES.md) and installed under /tmp/site.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 JUPYTER_LLM_HOME=$OUT/home
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv | tee "$OUT/nvidia-smi.csv"
timeout 240 python3 bench/gpu_mfu.py --steps 40 --compile > "$OUT/mfu.json" 2> "$OUT/mfu.err"; echo "mfu rc=$?"
# 1.5 B parameters (6 GB in fp32) against a 4 GiB cap of the GPU's memory
cat > "$OUT/big.yaml" <<YAML
name: gpu-big
model: {config: {model_type: gpt2, n_layer: 48, n_head: 25, n_embd: 1600}}
tokenizer: {train: {kind: char}}
data: {train: [examples/tinyshakespeare.txt], block_size: 256, val_fraction: 0.01}
train: {micro_batch_size: 4, max_steps: 6, log_every: 1, eval_every: 0, save_every: 0, precision: bf16}
optim: {lr: 1.0e-4, warmup_steps: 1}
distributed: {procs_per_node: 1, zero_stage: 3, offload: auto}
YAML
JUPYTER_LLM_GPU_MEMORY_FRACTION=0.03 timeout 330 python3 -m jupyter_llm.cli train "$OUT/big.yaml" --wait \
  > "$OUT/big.out" 2>&1; echo "big rc=$?"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); res = {}
try: res["mfu"] = json.loads((out / "mfu.json").read_text())
except Exception as e: res["mfu_error"] = str(e)
runs = sorted((out / "home" / "runs").glob("*-gpu-big-*"))
if runs:
    r = runs[-1]
    m = [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in l] if (r / "metrics.jsonl").exists() else []
    fit = json.loads((r / "fit.json").read_text()) if (r / "fit.json").exists() else {}
    res["big"] = {"state": json.loads((r / "status.json").read_text())["state"], "chosen": fit.get("chosen"),
                  "estimate": [c for c in fit.get("candidates", []) if c["chosen"]],
                  "losses": [x["loss"] for x in m], "mem_peak_mb": max((x["mem_peak_mb"] for x in m), default=None),
                  "step_time_s": [x["step_time_s"] for x in m]}
(out / "gpu_check.json").write_text(json.dumps(res, indent=2)); print(json.dumps(res, indent=2))
PY
