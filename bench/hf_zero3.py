"""The baseline of bench/scale.py: a model trained through Hugging Face's own DeepSpeed
integration as the Trainer sets it up (HfDeepSpeedConfig before the model is built, so it is
built under zero.Init), at DeepSpeed's default ZeRO-3 settings, no offload. One rank.

python bench/hf_zero3.py --layers N --embd E --heads H --block B --steps S --corpus FILE
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.integrations import HfDeepSpeedConfig

ap = argparse.ArgumentParser()
for name in ("layers", "embd", "heads", "block", "steps"):
    ap.add_argument(f"--{name}", type=int, required=True)
ap.add_argument("--corpus", required=True)
args = ap.parse_args()

deepspeed.init_distributed()
text = Path(args.corpus).read_text(encoding="utf-8")
chars = sorted(set(text))
ids = torch.tensor([chars.index(c) for c in text[:200_000]])
ds_config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "zero_optimization": {"stage": 3},  # DeepSpeed's defaults for everything else
    "steps_per_print": 2**31 - 1,
}
keep = HfDeepSpeedConfig(ds_config)  # must outlive the model's construction
config = GPT2Config(vocab_size=len(chars), n_positions=args.block, n_layer=args.layers, n_head=args.heads,
                    n_embd=args.embd)  # fmt: skip
model = AutoModelForCausalLM.from_config(config)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
losses = []
for step in range(args.steps):
    x = ids[step * args.block : (step + 1) * args.block][None]
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print(json.dumps({"losses": losses}))
