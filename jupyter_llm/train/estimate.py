"""Memory estimate per ZeRO stage for a spec: `python -m jupyter_llm.train.estimate SPEC.yaml`.

Runs in its own process (the kernel never imports torch). Builds the model on the meta
device (no memory, no weights read), counts parameters, and asks DeepSpeed's own
estimators; prints JSON, with the ZeRO-3 settings the worker derives from the same shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def estimate(spec_path: Path, ranks: int) -> dict[str, Any]:
    from .deps import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from ..spec import Spec, zero3_settings
    from .model import meta_shape

    spec = Spec.from_yaml(spec_path.read_text())
    shape = meta_shape(spec, _vocab_size(spec) or 0)
    total, largest = shape["params"], shape["largest_module_params"]
    tp = spec.distributed.tensor_parallel
    if tp > 1:  # each rank holds 1/tp of the (split) weights; ZeRO shards across the replicas
        total, largest, ranks = -(-total // tp), -(-largest // tp), max(ranks // tp, 1)
    off = spec.distributed.offload
    cpu = off in ("optimizer", "optimizer+params")  # DeepSpeed's estimators know CPU offload only
    z2_cpu, z2_dev = estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=cpu)
    z3_cpu, z3_dev, _ = estimate_zero3_model_states_mem_needs(
        total, largest, ranks, 1, cpu_offload=cpu, cpu_offload_params=off == "optimizer+params"
    )
    gib = 2**30
    return {
        "params": shape["params"],
        "tensor_parallel": tp,
        "largest_layer_params": shape["largest_module_params"],
        "shape": shape,
        # what the worker fills in for ZeRO-3's "auto" values (a value in deepspeed: wins)
        "zero3_settings": zero3_settings(shape),
        "per_rank_gib": {
            # stage 0 has no DeepSpeed estimator: fp32 weights + grads + Adam m and v, 16 bytes/param
            "0": {"device": 16 * total / gib, "cpu": 0.0, "source": "16 bytes/param"},
            "1-2": {"device": z2_dev / gib, "cpu": z2_cpu / gib, "source": "deepspeed estimate_zero2"},
            "3": {"device": z3_dev / gib, "cpu": z3_cpu / gib, "source": "deepspeed estimate_zero3"},
        },
    }


def _vocab_size(spec: Any) -> int | None:
    """The vocabulary the run will have: the trained tokenizer's target, or the chars seen."""
    train = spec.tokenizer.train
    if spec.tokenizer_source() is not None:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(spec.tokenizer_source()))
    if train is not None and train.kind != "char":
        return int(train.vocab_size)
    chars: set[str] = set()
    for f in spec.data.train:
        with open(f, encoding="utf-8", errors="replace") as fh:
            chars |= set(fh.read(10_000_000))  # the first 10 MB per file is plenty for a charset
    return len(chars) + 5  # plus the special tokens


if __name__ == "__main__":
    print(json.dumps(estimate(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)))
