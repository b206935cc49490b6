"""Memory estimate per ZeRO stage for a spec: `python -m jupyter_llm.train.estimate SPEC.yaml`.

Runs in its own process (the kernel never imports torch). Builds the model on the meta
device (no memory, no weights read), counts parameters, and asks DeepSpeed's own
estimators; prints JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def estimate(spec_path: Path, ranks: int) -> dict[str, Any]:
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from ..spec import Spec
    from .model import DEFAULT_CONFIGS

    spec = Spec.from_yaml(spec_path.read_text())
    auto = AutoModelForCausalLM if spec.model.task == "causal-lm" else AutoModelForMaskedLM
    if spec.model.pretrained:
        cfg = AutoConfig.from_pretrained(spec.model.pretrained)
    else:
        kwargs = dict(spec.model.config or DEFAULT_CONFIGS[spec.model.task])
        cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    vocab = _vocab_size(spec)
    if vocab is not None:
        cfg.vocab_size = max(vocab, int(getattr(cfg, "vocab_size", 0) if spec.model.pretrained else 0))
    with torch.device("meta"):
        model = auto.from_config(cfg)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    off = spec.distributed.offload
    z2_cpu, z2_dev = estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=off != "none")
    z3_cpu, z3_dev, _ = estimate_zero3_model_states_mem_needs(
        total, largest, ranks, 1, cpu_offload=off != "none", cpu_offload_params=off == "optimizer+params"
    )
    gib = 2**30
    return {
        "params": total,
        "largest_layer_params": largest,
        "vocab_size": cfg.vocab_size,
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
