"""Hand-written DeepSpeed loop: the seed's nanoGPT-style training loop on a DeepSpeed engine.

Run under DeepSpeed's launcher by bench/overhead.py; writes tokens/s to --out as JSON.
Same model, data, batch and DeepSpeed config as the jupyter_llm run it is compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from jupyter_llm.spec import on_cpu

ap = argparse.ArgumentParser()
ap.add_argument("--corpus", required=True)
ap.add_argument("--ds-config", required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--warmup", type=int, required=True)  # steps excluded from the timing
ap.add_argument("--block", type=int, required=True)
ap.add_argument("--layers", type=int, required=True)
ap.add_argument("--heads", type=int, required=True)
ap.add_argument("--embd", type=int, required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--first-step-file", help="write the wall-clock time the first step finished")
args = ap.parse_args()

deepspeed.init_distributed()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cfg = json.loads(Path(args.ds_config).read_text())
if not torch.cuda.is_available():  # the optimizer the worker picks on CPU ranks
    cfg = on_cpu(cfg)
B = cfg["train_micro_batch_size_per_gpu"]

text = Path(args.corpus).read_text(encoding="utf-8")
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor(np.array([stoi[c] for c in text], dtype=np.int64))
n = int(0.9 * len(data))
train = data[:n]

torch.manual_seed(1337)
config = GPT2Config(vocab_size=len(chars) + 2, n_positions=args.block, n_layer=args.layers, n_head=args.heads,
                    n_embd=args.embd, bos_token_id=0, eos_token_id=0)  # fmt: skip
config._attn_implementation = "sdpa"
model = GPT2LMHeadModel(config)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
torch.manual_seed(1337 + rank)


def get_batch() -> torch.Tensor:
    ix = torch.randint(len(train) - args.block, (B,))
    return torch.stack([train[i : i + args.block] for i in ix])


t0 = time.perf_counter()
for step in range(args.steps):
    if step == args.warmup:
        t0 = time.perf_counter()
    for _ in range(cfg["gradient_accumulation_steps"]):
        x = get_batch()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    if step == 0 and args.first_step_file and rank == 0:
        loss.item()
        Path(args.first_step_file).write_text(str(time.time()))
loss.item()
elapsed = time.perf_counter() - t0
tokens = (args.steps - args.warmup) * B * cfg["gradient_accumulation_steps"] * args.block * world
if rank == 0:
    Path(args.out).write_text(json.dumps({"tokens_per_s": tokens / elapsed}))
