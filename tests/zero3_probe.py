"""One rank of the ZeRO-3 partitioned-start test: builds the spec's model the way the worker
does (before any `deepspeed.initialize`) and records what DeepSpeed made of its parameters.

`python zero3_probe.py SPEC.yaml OUT_DIR TOKENIZER [PARAM_NAME SAFETENSORS_FILE]`
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoTokenizer

from jupyter_llm.spec import Spec, deepspeed_config, resolve_auto
from jupyter_llm.train.model import build_model, meta_shape, shape_of

spec = Spec.from_yaml(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
deepspeed.init_distributed()
rank = int(os.environ["RANK"])
tok = AutoTokenizer.from_pretrained(sys.argv[3])
cfg = resolve_auto(deepspeed_config(spec), meta_shape(spec, len(tok)))
model = build_model(spec, tok, cfg)
params = dict(model.named_parameters())
rec = {
    "all_partitioned": all(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in params.values()),
    "status": sorted({str(getattr(p, "ds_status", None)) for p in params.values()}),
    "local_numel": sum(p.numel() for p in params.values()),  # what this rank holds unpartitioned
    "shard_numel": sum(p.ds_tensor.numel() for p in params.values() if hasattr(p, "ds_tensor")),
    "total": shape_of(model)["params"],
    "live_limit": cfg["zero_optimization"]["stage3_max_live_parameters"],
}
if len(sys.argv) > 4:  # a loaded weight, gathered, against the checkpoint file
    from safetensors.torch import load_file

    name, ref = sys.argv[4], load_file(sys.argv[5])
    key = name.split(".", 1)[1]  # the checkpoint's name has no task-head prefix ("bert.")
    with deepspeed.zero.GatheredParameters([params[name]]):
        rec["loaded_equal"] = bool(torch.equal(params[name].data, ref[key]))
with deepspeed.zero.GatheredParameters(list(params.values())):
    rec["checksum"] = float(sum(p.data.double().abs().sum() for p in params.values()))
(out / f"rank{rank}.json").write_text(json.dumps(rec))
